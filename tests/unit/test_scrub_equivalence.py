"""The engine's SCRUB ends with the same weights as a direct transcription of docs/algorithm.md's schedule,
and the teacher never changes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.backends.single import SingleProcessBackend
from engine.config import load_config
from engine.data.vision import ImageStream, ImageTransform, prepare_data
from engine.loop import run_loop
from engine.methods.scrub import Scrub, ScrubConfig
from engine.models.loading import classifier_logits
from engine.models.vision import build_vision_model
from engine.testing import tiny_overrides

SEED = 3


@pytest.fixture(scope="module")
def tiny_data(tiny_cifar, tmp_path_factory):
    cfg = load_config(
        None, tiny_overrides(tiny_cifar, tmp_path_factory.mktemp("eq"), **{"forget.label": "0"})
    )
    return prepare_data(cfg.data, cfg.forget), cfg


def transcription(model, forget_x, retain_x, retain_y, c: ScrubConfig, seed: int):
    """docs/algorithm.md's faithful schedule, written out with nothing from the engine."""
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model)
    if c.optimizer == "sgd":
        opt = torch.optim.SGD(student.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    else:
        opt = torch.optim.Adam(student.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    T = c.temperature

    def d_T(s, t):
        return F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean") * T * T

    def penalty():
        if not c.param_distance:
            return 0.0
        return c.param_distance * sum(
            (a - b).norm() for a, b in zip(student.parameters(), teacher.parameters())
        )

    def order(n, epoch, code):  # the documented order: randperm seeded by seed*1_000_003 + epoch*1_009 + code
        return torch.randperm(
            n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + code)
        )

    for e in range(1, c.epochs + 1):
        lr = c.lr * c.lr_decay_rate ** sum(1 for d in c.lr_decay_epochs if e > d)
        for g in opt.param_groups:
            g["lr"] = lr
        student.train()
        if e <= c.msteps:
            for idx in order(len(forget_x), e, 1).split(c.forget_batch_size):
                with torch.no_grad():
                    t = teacher(pixel_values=forget_x[idx]).logits
                s = student(pixel_values=forget_x[idx]).logits
                loss = -d_T(s, t) + penalty()
                opt.zero_grad()
                loss.backward()
                opt.step()
        for idx in order(len(retain_x), e, 2).split(c.retain_batch_size):
            with torch.no_grad():
                t = teacher(pixel_values=retain_x[idx]).logits
            s = student(pixel_values=retain_x[idx]).logits
            loss = c.gamma * F.cross_entropy(s, retain_y[idx]) + c.alpha * d_T(s, t) + penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return student, teacher


def engine_run(model, data, c: ScrubConfig, seed: int):
    transform = ImageTransform([0.5] * 3, [0.25] * 3)
    backend = SingleProcessBackend("cpu")
    student, teacher = backend.prepare(copy.deepcopy(model), copy.deepcopy(model), c.build_optimizer)
    streams = {"forget": ImageStream(data.forget, transform), "retain": ImageStream(data.retain, transform)}
    run_loop(
        Scrub(c),
        backend,
        student,
        teacher,
        streams,
        classifier_logits,
        seed=seed,
        epochs=c.epochs,
        progress=False,
    )
    return student, teacher, transform


CASES = {
    "sgd": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, lr_decay_epochs=[1, 2]),
    "adam": dict(optimizer="adam", lr=1e-3, weight_decay=0.1, lr_decay_epochs=[2]),
    "adam+distance": dict(
        optimizer="adam", lr=1e-3, weight_decay=0.0, lr_decay_epochs=[2], param_distance=0.5
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_scrub_equals_pseudocode_transcription(tiny_data, case):
    data, _ = tiny_data
    c = ScrubConfig(epochs=3, msteps=2, temperature=4.0, gamma=0.99, alpha=0.5,
                    forget_batch_size=16, retain_batch_size=24, **CASES[case])  # fmt: skip
    torch.manual_seed(0)
    model = build_vision_model("preact_resnet18", num_labels=3, width=0.125)
    original = copy.deepcopy(model.state_dict())

    student, teacher, transform = engine_run(model, data, c, SEED)
    ref_student, _ = transcription(
        model, transform(data.forget.images), transform(data.retain.images), data.retain.labels, c, SEED
    )
    got, want = student.state_dict(), ref_student.state_dict()
    moved = 0.0
    for name in want:
        # Same operations in the same order on one thread: equal up to float reassociation.
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=f"{case}: {name} differs")
        if got[name].is_floating_point():
            moved = max(moved, (got[name] - original[name]).abs().max().item())
    assert moved > 1e-3, "the student did not move: the comparison would prove nothing"
    for name, value in teacher.state_dict().items():  # weights AND BatchNorm running statistics
        assert torch.equal(value, original[name]), f"the teacher changed: {name}"


def test_max_step_moves_a_vision_student_from_the_first_batch(tiny_data):
    """docs/algorithm.md, "The start-at-teacher problem": in train mode (BatchNorm batch statistics) the student differs from
    the eval-mode teacher, so the very first max-step has a non-zero gradient."""
    data, _ = tiny_data
    torch.manual_seed(0)
    model = build_vision_model("preact_resnet18", num_labels=3, width=0.125)
    teacher = copy.deepcopy(model).eval()
    x = ImageTransform([0.5] * 3, [0.25] * 3)(data.forget.images[:16])
    model.train()
    loss = Scrub(ScrubConfig()).loss(
        "max", model(pixel_values=x).logits, teacher(pixel_values=x).logits.detach(), None
    )
    (loss.total / loss.count).backward()
    grad = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    assert grad.item() > 1e-4
