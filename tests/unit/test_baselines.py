"""The vision baselines (retrain, finetune, neggrad_plus, cf_k, eu_k, bad_teacher, fisher): losses and
Fisher values against numbers computed by hand, the blocks of each architecture, what ``prepare``
freezes and re-initialises, the loop's per-phase teacher, and the paired image stream."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.backends.single import SingleProcessBackend
from engine.cli import HELP
from engine.config import METHOD_TAGS, load_config
from engine.data.paired import PairedStream
from engine.data.vision import ImageSet, ImageStream, ImageTransform
from engine.errors import ConfigError
from engine.loop import run_loop
from engine.methods import METHODS, build_method
from engine.methods.bad_teacher import BadTeacher, BadTeacherConfig
from engine.methods.base import MethodContext
from engine.methods.blocks import (
    BlocksError,
    fresh_model,
    head_parameter_names,
    last_blocks,
    model_blocks,
)
from engine.methods.fisher import Fisher, FisherConfig, fisher_diagonal, fisher_mean_var
from engine.methods.last_k import CfK, CfKConfig, EuK, EuKConfig
from engine.methods.neggrad_plus import NegGradPlus, NegGradPlusConfig
from engine.methods.retrain import Retrain, RetrainConfig
from engine.models.vision import build_vision_model

BASELINES = ("retrain", "finetune", "neggrad_plus", "cf_k", "eu_k", "bad_teacher", "fisher")


def log_softmax(xs):
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def forward(model, batch):
    return model(pixel_values=batch["pixel_values"]).logits


def ctx_for(model, retain_batches=None, forget_classes=None, fwd=forward) -> MethodContext:
    backend = SingleProcessBackend(device="cpu")
    return MethodContext(
        forward=fwd,
        retain_batches=retain_batches or (lambda bs: iter(())),
        freeze=backend.prepare_frozen,
        device=torch.device("cpu"),
        forget_classes=forget_classes,
    )


def tiny(arch="preact_resnet18", labels=3, width=0.05):
    return build_vision_model(arch, labels, width)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- registration


def test_every_baseline_is_registered_and_configurable():
    for name in BASELINES:
        assert name in METHODS and name in METHOD_TAGS and name in HELP["run"]
        cfg = load_config(None, [f"method={name}"])
        assert cfg.method.name == name
        method = build_method(cfg.method)
        for attr in ("needs_teacher", "phases", "loss", "penalty"):
            assert hasattr(method, attr)
        for field in type(cfg.method).model_fields.values():
            assert field.description, f"{name}: a field has no description"
    assert set(METHODS) <= set(METHOD_TAGS)


def test_defaults_follow_the_papers():
    c = {n: load_config(None, [f"method={n}"]).method for n in BASELINES}
    assert (c["retrain"].epochs, c["retrain"].lr, c["retrain"].lr_decay_epochs, c["retrain"].augment) == (
        16, 0.05, [8, 12], True
    )  # fmt: skip
    assert (c["finetune"].epochs, c["finetune"].lr, c["finetune"].lr_decay_epochs) == (10, 0.01, [])
    assert (c["neggrad_plus"].beta, c["neggrad_plus"].epochs, c["neggrad_plus"].lr) == (0.95, 5, 0.01)
    assert (c["cf_k"].k, c["cf_k"].lr, c["eu_k"].k, c["eu_k"].lr) == (2, 0.01, 2, 0.05)
    bt = c["bad_teacher"]
    assert (bt.optimizer, bt.lr, bt.epochs, bt.temperature, bt.batch_size) == ("adam", 1e-4, 1, 4.0, 64)
    assert c["fisher"].alpha == 1e-6 and c["fisher"].epochs == 1
    with pytest.raises(ConfigError, match="epochs"):
        load_config(None, ["method=fisher", "method.epochs=2"])
    with pytest.raises(ConfigError, match="beta"):
        load_config(None, ["method=neggrad_plus", "method.beta=1.5"])


# ----------------------------------------------------------------------------- NegGrad+


def test_neggrad_plus_loss_by_hand():
    f_logits, f_y = [[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]], [0, 2]
    r_logits, r_y = [[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 2.0, 1.0]], [1, 0, 2]
    ce = lambda rows, ys: sum(-log_softmax(r)[y] for r, y in zip(rows, ys)) / len(ys)  # noqa: E731
    beta = 0.9
    expected = beta * ce(r_logits, r_y) - (1 - beta) * ce(f_logits, f_y)
    # rows interleaved on purpose: the mask, not the position, says which half a row is in
    logits = torch.tensor(
        [r_logits[0], f_logits[0], r_logits[1], f_logits[1], r_logits[2]], dtype=torch.float64
    )
    labels = torch.tensor([r_y[0], f_y[0], r_y[1], f_y[1], r_y[2]])
    is_forget = torch.tensor([False, True, False, True, False])
    method = NegGradPlus(NegGradPlusConfig(beta=beta))
    batch = {"is_forget": is_forget, "forget_token": is_forget}  # an image counts once: items = rows
    terms = method.loss("paired", logits, None, labels, batch)
    assert method.part_counts("paired", batch) == (2, 3)  # each mean over its own rows
    assert terms.mean((2, 3)).item() == pytest.approx(expected, rel=1e-12)
    # written out: retain CEs ln(e+e^3+1)-3 = .1700, ln 3 = 1.0986, ln(e^-1+e^2+e)-1 = 1.3490 (mean .8725);
    # forget CEs ln(e^2+1+e^-1)-2 = .1699, ln(2e^.5+e)-1 = .7944 (mean .4822): .9 * .8725 - .1 * .4822 = .7370
    assert expected == pytest.approx(0.7370, abs=1e-4)
    with pytest.raises(ValueError, match="paired"):
        NegGradPlus(NegGradPlusConfig()).loss("paired", logits, None, labels, {})
    assert [p.stream for p in NegGradPlus(NegGradPlusConfig()).phases(1)] == ["paired"]


def _image_set(n: int, label: int, offset: int) -> ImageSet:
    g = torch.Generator().manual_seed(offset)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return ImageSet(images, torch.full((n,), label), list(range(offset, offset + n)))


def test_the_paired_stream_pairs_each_forget_image_with_a_seeded_retain_image():
    t = ImageTransform([0.5] * 3, [0.25] * 3)
    forget, retain = ImageStream(_image_set(6, 0, 0), t), ImageStream(_image_set(20, 1, 100), t)
    paired = PairedStream(forget, retain)
    assert len(paired) == 6
    rows = torch.tensor([4, 1, 3])
    b = paired.get(rows, seed=11)
    assert b["pixel_values"].shape == (6, 3, 8, 8)
    assert b["is_forget"].tolist() == [True, True, True, False, False, False]
    # each image is one counted item: what GradDiff and NPO read for text tokens means rows here
    assert torch.equal(b["forget_token"], b["is_forget"]) and b["sequence"].tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(b["rows"], rows) and b["partner_rows"].shape == (3,)
    assert torch.equal(b["pixel_values"][:3], forget.get(rows)["pixel_values"])
    assert torch.equal(b["pixel_values"][3:], retain.get(b["partner_rows"])["pixel_values"])
    assert b["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    # a row's partner depends on (seed, row) only, not on the rest of the batch
    alone = paired.get(torch.tensor([3]), seed=11)
    assert alone["partner_rows"].item() == b["partner_rows"][2].item()
    other_seed = torch.stack([paired.get(torch.tensor([r]), seed=12)["partner_rows"][0] for r in range(6)])
    same_seed = torch.stack([paired.get(torch.tensor([r]), seed=11)["partner_rows"][0] for r in range(6)])
    assert not torch.equal(other_seed, same_seed)


# ----------------------------------------------------------------------------- blocks


def test_blocks_of_each_architecture():
    resnet = [n for n, _ in model_blocks(tiny("preact_resnet18"))]
    assert resnet == ["conv1", "bn1"] + [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)] + ["linear"]
    allcnn = [n for n, _ in model_blocks(tiny("allcnn"))]
    assert allcnn == [f"features.{i}" for i in (0, 1, 2, 4, 5, 6, 8, 9)] + ["classifier.0"]
    # the default k=2: the last residual block / conv unit and the head
    assert [n for n, _ in last_blocks(tiny("preact_resnet18"), 2)] == ["layer4.1", "linear"]
    assert [n for n, _ in last_blocks(tiny("allcnn"), 2)] == ["features.9", "classifier.0"]
    assert head_parameter_names(tiny("allcnn")) == {"classifier.0.weight", "classifier.0.bias"}
    with pytest.raises(ValueError, match="k=12 but PreActResNetForImageClassification has 11 blocks"):
        last_blocks(tiny("preact_resnet18"), 12)
    assert issubclass(BlocksError, ConfigError)  # printed by the CLI without a traceback


def test_retrain_prepare_reinitialises_every_weight_from_torch_rng():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected = fresh_model(model).state_dict()
    torch.manual_seed(5)
    Retrain(RetrainConfig()).prepare(model, ctx_for(model))
    after = model.state_dict()
    assert all(torch.equal(after[k], expected[k]) for k in after)
    assert not torch.equal(after["linear.weight"], before["linear.weight"])
    assert not torch.equal(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])


@pytest.mark.parametrize("arch", ["preact_resnet18", "allcnn"])
def test_eu_k_reinitialises_and_trains_only_the_last_k_blocks(arch):
    model = tiny(arch)
    with torch.no_grad():  # non-default BN statistics, so a re-initialisation would show in them
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    EuK(EuKConfig(k=2)).prepare(model, ctx_for(model))
    trained = {n for n, _ in last_blocks(model, 2)}
    for name, block in model_blocks(model):
        grads = {p.requires_grad for p in block.parameters()}
        state = {f"{name}.{k}": v for k, v in block.state_dict().items()}
        if name in trained:
            assert grads == {True}
            assert any(not torch.equal(v, before[k]) for k, v in state.items() if v.is_floating_point())
        else:
            assert grads == {False}
            assert all(torch.equal(v, before[k]) for k, v in state.items())
    # frozen blocks keep eval-mode BatchNorm (fixed statistics) while the loop trains the student
    model.train()
    model(pixel_values=torch.randn(4, 3, 8, 8))
    for name, block in model_blocks(model):
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.training == (name in trained)
                if name not in trained:
                    assert torch.all(m.running_mean == 0.3)


def test_cf_k_freezes_without_reinitialising():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    CfK(CfKConfig(k=3)).prepare(model, ctx_for(model))
    assert states_equal_dict(model.state_dict(), before)
    grads = {name: {p.requires_grad for p in block.parameters()} for name, block in model_blocks(model)}
    assert {n for n, g in grads.items() if g == {True}} == {"layer4.0", "layer4.1", "linear"}
    assert {n for n, g in grads.items() if g == {False}} == set(grads) - {"layer4.0", "layer4.1", "linear"}
    # the single-process backend builds the optimizer over the trainable parameters only
    backend = SingleProcessBackend(device="cpu")
    backend.prepare(model, None, CfKConfig().build_optimizer)
    in_optimizer = {id(p) for g in backend.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="blocks"):
        CfK(CfKConfig(k=30)).prepare(tiny(), ctx_for(model))


def states_equal_dict(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- Bad-Teacher


def test_bad_teacher_phases_loss_and_teacher_choice():
    bt = BadTeacher(BadTeacherConfig(temperature=2.0, batch_size=7))
    assert [(p.name, p.stream, p.batch_size) for p in bt.phases(1)] == [
        ("forget", "forget", 7),
        ("retain", "retain", 7),
    ]
    s = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    p = [math.exp(v) for v in log_softmax([2.0 / 2, 1.0 / 2, 0.0])]
    q = [math.exp(v) for v in log_softmax([1.0 / 2, 2.0 / 2, 0.5 / 2])]
    kl = 4 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    for phase in ("forget", "retain"):
        terms = bt.loss(phase, s, t, torch.tensor([0]))
        assert terms.count == 1 and terms.total.item() == pytest.approx(kl, rel=1e-12)
    with pytest.raises(ValueError, match="phases"):
        bt.loss("max", s, t, torch.tensor([0]))
    model = tiny()
    original = object()
    with pytest.raises(RuntimeError, match="prepare"):
        bt.teacher_for("forget", original)
    torch.manual_seed(1)
    bt.prepare(model, ctx_for(model))
    torch.manual_seed(1)
    assert states_equal(bt.incompetent, fresh_model(model))  # a fresh random net of the same class
    assert not bt.incompetent.training and not any(p.requires_grad for p in bt.incompetent.parameters())
    assert bt.teacher_for("forget", original) is bt.incompetent
    assert bt.teacher_for("retain", original) is original


class _Stream:
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def get(self, rows, seed=0):
        return {"pixel_values": self.x[rows], "labels": self.y[rows], "rows": rows}


def test_the_loop_gives_each_phase_its_teacher():
    torch.manual_seed(0)
    student = tiny("allcnn")
    teacher = SingleProcessBackend(device="cpu").prepare_frozen(fresh_model(student))
    seen = []

    class Recording(BadTeacher):
        def loss(self, phase, student_logits, teacher_logits, labels, batch=None):
            seen.append((phase, teacher_logits, batch["pixel_values"]))
            return super().loss(phase, student_logits, teacher_logits, labels, batch)

    method = Recording(BadTeacherConfig(batch_size=4))
    method.prepare(student, ctx_for(student))
    backend = SingleProcessBackend(device="cpu")
    student, teacher = backend.prepare(student, teacher, method.config.build_optimizer)
    streams = {
        "forget": _Stream(torch.randn(6, 3, 8, 8), torch.zeros(6, dtype=torch.long)),
        "retain": _Stream(torch.randn(8, 3, 8, 8), torch.ones(8, dtype=torch.long)),
    }
    state = run_loop(method, backend, student, teacher, streams, forward, seed=0, epochs=1, progress=False)
    assert [p for p, _, _ in seen] == ["forget"] * 2 + ["retain"] * 2
    assert set(state.losses) == {"forget", "retain"}
    with torch.no_grad():
        for phase, logits, x in seen:
            expected = forward(method.incompetent if phase == "forget" else teacher, {"pixel_values": x})
            assert torch.equal(logits, expected)
            other = forward(teacher if phase == "forget" else method.incompetent, {"pixel_values": x})
            assert not torch.allclose(logits, other)


# ----------------------------------------------------------------------------- Fisher


class Toy(nn.Module):
    """logits = W (s x): a 1-d "BatchNorm-like" scale s and a 2-class head W (2 x 1)."""

    def __init__(self, s=0.5, w=(1.5, -0.5)):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([s], dtype=torch.float64))
        self.head = nn.Linear(1, 2, bias=False).double()
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[w[0]], [w[1]]], dtype=torch.float64))

    def forward(self, x):
        return self.head(self.scale * x)


def toy_forward(model, batch):
    return model(batch["pixel_values"])


XS = [1.0, -2.0, 0.5]


def toy_batches(bs):
    x = torch.tensor(XS, dtype=torch.float64).view(-1, 1)
    for i in range(0, len(XS), bs):
        yield {"pixel_values": x[i : i + bs], "labels": torch.zeros(len(x[i : i + bs]), dtype=torch.long)}


def hand_fisher(s=0.5, w=(1.5, -0.5)):
    """F_Wk = mean z^2 p_k (1 - p_k) with z = s x; F_s = mean x^2 p_0 p_1 (w0 - w1)^2 (derived in the test)."""
    fw, fs = [0.0, 0.0], 0.0
    for x in XS:
        z = s * x
        p = [math.exp(v) for v in log_softmax([w[0] * z, w[1] * z])]
        for k in range(2):
            fw[k] += z * z * p[k] * (1 - p[k]) / len(XS)
        fs += x * x * p[0] * p[1] * (w[0] - w[1]) ** 2 / len(XS)
    return fw, fs


@pytest.mark.parametrize("chunk", [1, 2, 8])
def test_fisher_diagonal_matches_the_hand_formula(chunk):
    toy = Toy()
    got = fisher_diagonal(toy, toy_forward, toy_batches(2), chunk_size=chunk)
    fw, fs = hand_fisher()
    assert got["head.weight"].view(-1).tolist() == pytest.approx(fw, rel=1e-10)
    assert got["scale"].item() == pytest.approx(fs, rel=1e-10)
    assert toy.training  # mode restored


def test_fisher_variance_rule():
    alpha = 1e-3
    head = torch.zeros(2, 3)
    f_head = torch.tensor([[0.5, 1e-9, 2.0], [4.0, 4.0, 4.0]])
    mu, var = fisher_mean_var(head, f_head, alpha, is_head=True)
    # rows: mean over dim 1 of alpha * min(1/(F+1e-8), 1e2), then x10 for the head
    row0 = alpha * (1 / (0.5 + 1e-8) + 1e2 + 1 / (2.0 + 1e-8)) / 3 * 10
    row1 = alpha * (1 / (4.0 + 1e-8)) * 10
    assert var[0].tolist() == pytest.approx([row0] * 3, rel=1e-6)
    assert var[1].tolist() == pytest.approx([row1] * 3, rel=1e-6)
    assert torch.equal(mu, head)
    # a non-head matrix: clamp at 1e3, no x10
    w = torch.ones(2, 2)
    _, var = fisher_mean_var(w, torch.tensor([[1e-9, 1.0], [0.1, 0.1]]), alpha, is_head=False)
    assert var[0].tolist() == pytest.approx([alpha * (1e3 + 1 / (1 + 1e-8)) / 2] * 2, rel=1e-6)
    assert var[1].tolist() == pytest.approx([alpha * 10 / (1 + 1e-7)] * 2, rel=1e-6)
    # 1-d (BatchNorm): element-wise, x10
    _, var = fisher_mean_var(torch.ones(2), torch.tensor([0.25, 1e-12]), alpha, is_head=False)
    assert var.tolist() == pytest.approx([alpha * 4 * 10, alpha * 1e3 * 10], rel=1e-6)
    # class unlearning: the forgotten class's head row (and bias) centred at 0 with variance 1e-4 (x10)
    head = torch.full((3, 2), 7.0)
    mu, var = fisher_mean_var(head, torch.ones(3, 2), alpha, is_head=True, forget_rows=[1])
    assert mu[1].tolist() == [0.0, 0.0] and mu[0].tolist() == [7.0, 7.0]
    assert var[1].tolist() == pytest.approx([1e-3, 1e-3]) and var[0].tolist() == pytest.approx(
        [alpha * 10] * 2
    )


def test_fisher_prepare_adds_noise_by_the_rule():
    toy = Toy()
    alpha = 1e-2
    fw, fs = hand_fisher()
    fisher = Fisher(FisherConfig(alpha=alpha, chunk_size=2, batch_size=2))
    assert fisher.phases(1) == []
    torch.manual_seed(0)
    fisher.prepare(toy, ctx_for(toy, toy_batches, forget_classes=[0], fwd=toy_forward))
    torch.manual_seed(0)
    noise_s, noise_w = torch.randn(1, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64)
    var_s = alpha * min(1 / (fs + 1e-8), 1e3) * 10  # 1-d: x10
    var_w1 = alpha * min(1 / (fw[1] + 1e-8), 1e2) * 10  # head: x10
    assert toy.scale.item() == pytest.approx(0.5 + math.sqrt(var_s) * noise_s.item(), rel=1e-10)
    # row 0 is the forgotten class: mean 0, variance 1e-3; row 1 keeps its weight plus noise
    assert toy.head.weight[0, 0].item() == pytest.approx(math.sqrt(1e-3) * noise_w[0, 0].item(), rel=1e-10)
    assert toy.head.weight[1, 0].item() == pytest.approx(
        -0.5 + math.sqrt(var_w1) * noise_w[1, 0].item(), rel=1e-10
    )
    assert fisher.variance["scale"].item() == pytest.approx(var_s, rel=1e-10)
    with pytest.raises(ValueError, match="no training phases"):
        fisher.loss("min", None, None, None)
