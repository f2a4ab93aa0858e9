"""Each vision baseline, run by `unlearn run ... method=NAME` on real CIFAR-10 images, moves a tiny
trained original the way it should: Retrain/EU-k forget a class the way never seeing it does, CF-k
changes only its last blocks, Finetune lowers the retain loss, NegGrad+ raises the forget loss more than
the retain loss, Bad-Teacher pulls forget predictions towards its random teacher, Fisher adds noise of
the Fisher rule's scale and wipes the forgotten class's head row. One original per module.

The bounds are directions with a margin, or ratios to a control run in the same test, never constants fitted
to one install's numbers: a tiny model's losses and errors move with the image decoder, the library versions
and the CPU. Each was measured over training seeds 0-8 (the margins are in the comments)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from engine.cli import main
from engine.config import load_config
from engine.eval.metrics import predict
from engine.methods.bad_teacher import BadTeacher
from engine.methods.blocks import head_parameter_names, last_blocks, model_blocks
from engine.methods.fisher import Fisher, fisher_diagonal, fisher_mean_var
from engine.models.loading import classifier_logits, load_classifier
from engine.tasks.image_classification import load_data_and_transform
from engine.testing import tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tiny_cifar, tmp_path_factory):
    """A tiny original (3 classes, 40 train images each, width 0.25) and what the checks need."""
    tmp = tmp_path_factory.mktemp("baselines")
    over = [o for o in tiny_overrides(tiny_cifar, tmp) if not o.startswith("method.")]
    over += [
        "forget.label=airplane",
        # an original that knows its 120 training images: no augmentation, a learning rate it can settle at,
        # decayed for the last 4 epochs. The earlier recipe (lr 0.05 with augmentation) left it nearly collapsed
        # (20% forget but 61% retain error: it predicted airplane for most images), and every number downstream
        # then moved by chance from one install to the next.
        "train.epochs=12",
        "train.augment=false",
        "train.batch_size=16",
        "train.lr=0.01",
        "train.lr_decay_epochs=[8]",
        "model.width=0.25",
        "eval.every_epoch=false",
    ]
    assert (
        main(["train", "configs/demo.yaml", *over, f"output_dir={tmp / 'models'}", "--only", "original"]) == 0
    )
    original = tmp / "models" / "original"
    # what every check below relies on: the original knows the class it forgets, and the others (seeds 0-8:
    # forget error 0-10%, retain error 0-3.75%)
    known = json.loads((original / "report.json").read_text())["metrics"]
    assert known["forget_error"] < 25.0 and known["retain_error"] < 15.0, known
    over += [f"model.path={original}", "eval.reference=null"]
    cfg = load_config("configs/demo.yaml", over)
    data, _, transform = load_data_and_transform(cfg, str(original))
    return {"tmp": tmp, "over": over, "original": original, "data": data, "transform": transform}


def unlearn(setup, name: str, *extra: str) -> tuple[dict, dict, torch.nn.Module]:
    out = setup["tmp"] / name
    assert (
        main(["run", "configs/demo.yaml", *setup["over"], f"output_dir={out}", f"method={name}", *extra]) == 0
    )
    report = json.loads((out / "report.json").read_text())
    return report, load_file(out / "model" / "model.safetensors"), load_classifier(str(out / "model"), 3)


def original_model(setup):
    return load_classifier(str(setup["original"]), 3)


def mean_loss(setup, model, split: str) -> float:
    return float(predict(model, getattr(setup["data"], split), setup["transform"], 256, "cpu")["loss"].mean())


def block_changed(model, before: dict, after: dict) -> dict[str, bool]:
    """block name -> whether any of its state (weights or BatchNorm statistics) changed."""
    out = {}
    for name, block in model_blocks(model):
        keys = [f"{name}.{k}" for k in block.state_dict()]
        out[name] = any(
            not torch.equal(before[k], after[k]) for k in keys if not k.endswith("num_batches_tracked")
        )
    return out


def test_retrain_forgets_like_never_seeing_the_class(setup):
    report, after, _ = unlearn(setup, "retrain", "method.epochs=3", "method.lr_decay_epochs=[]")
    before = original_model(setup).state_dict()
    # every weight tensor was re-initialised, then trained on D_r only: the forgotten class is never predicted
    assert all(not torch.equal(before[k], after[k]) for k in after if k.endswith("weight"))
    assert report["metrics"]["forget_error"] >= 95.0  # seeds 0-8: 100
    assert report["train_seconds"] >= report["prepare_seconds"] > 0


def test_eu_k_retrains_only_the_last_blocks_from_scratch(setup):
    # batches of 16: 5 steps an epoch (the default 64 gives 2, and left 77.5-82.5% error on 4 of 6 seeds)
    extra = ("method.epochs=2", "method.lr_decay_epochs=[]", "method.batch_size=16")
    report, after, model = unlearn(setup, "eu_k", *extra)
    before = original_model(setup).state_dict()
    changed = block_changed(model, before, after)
    assert [n for n, c in changed.items() if c] == ["layer4.1", "linear"]  # the default k=2
    # the head was re-initialised and only saw D_r: like Retrain, the class is gone (seeds 0-8: 100)
    assert report["metrics"]["forget_error"] >= 90.0


def test_cf_k_changes_only_the_last_k_blocks(setup):
    report, after, model = unlearn(setup, "cf_k", "method.k=3", "method.epochs=2", "method.lr=0.05")
    before = original_model(setup).state_dict()
    changed = block_changed(model, before, after)
    assert [n for n, c in changed.items() if c] == ["layer4.0", "layer4.1", "linear"]
    # fine-tuned on D_r without the class: the forget error can only go up (seeds 0-8: by 45 to 100 points),
    # the retain fit holds (seeds 0-8: 0% after, 0-3.75% before)
    assert report["metrics"]["forget_error"] > report["original"]["forget_error"]
    assert report["metrics"]["retain_error"] <= report["original"]["retain_error"] + 10.0


def test_finetune_lowers_the_retain_loss(setup):
    # from a model that does not fit D_r: the original with its head zeroed (uniform predictions, loss ln 3).
    # The original itself already fits D_r (retain loss 0.02-0.09), where 2 epochs at Finetune's lr move that
    # loss up or down by chance.
    start = setup["tmp"] / "zero_head"
    shutil.copytree(setup["original"], start)
    model = original_model(setup)
    head = head_parameter_names(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in head:
                p.zero_()
    model.save_pretrained(start)
    before = mean_loss(setup, load_classifier(str(start), 3), "retain")
    assert before == pytest.approx(math.log(3), abs=1e-4)
    _, _, model = unlearn(setup, "finetune", f"model.path={start}", "method.epochs=2", "method.batch_size=16")
    after = mean_loss(setup, model, "retain")
    assert after < 0.5 * before, f"retain loss {before:.3f} -> {after:.3f}"  # seeds 0-8: 0.008-0.070


def test_neggrad_plus_raises_the_forget_loss_more_than_the_retain_loss(setup):
    # 3 epochs: ascent compounds, and after 2 it had barely started on some seeds (forget loss 0.07 -> 1.3)
    run = ("method.epochs=3", "method.batch_size=8")
    report, _, model = unlearn(setup, "neggrad_plus", *run, "method.beta=0.8")
    original = original_model(setup)
    d_forget = mean_loss(setup, model, "forget") - mean_loss(setup, original, "forget")
    d_retain = mean_loss(setup, model, "retain") - mean_loss(setup, original, "retain")
    # ratios, not loss constants: how far ascent has gone varies from model to model (seeds 0-8: d_forget
    # 10-139, at least 5x d_retain)
    assert d_forget > 0 and d_forget > 2 * d_retain, (d_forget, d_retain)
    assert list(report["losses"]) == ["paired"] and len(report["losses"]["paired"]) == 3 * 5  # 40 forget / 8
    # the ascent term is what forgets beyond fine-tuning on the same paired batches (beta=1: no ascent; seeds
    # 0-8: at least 4.7x the forget loss of that control)
    _, _, descent_only = unlearn(setup, "neggrad_plus", *run, "method.beta=1.0")
    forget, control = mean_loss(setup, model, "forget"), mean_loss(setup, descent_only, "forget")
    assert forget > 2 * control, (forget, control)


def test_bad_teacher_moves_forget_predictions_towards_the_random_teacher(setup, monkeypatch):
    teachers = []
    prepare = BadTeacher.prepare

    def keep(self, student, ctx):
        prepare(self, student, ctx)
        teachers.append(self.incompetent)

    monkeypatch.setattr(BadTeacher, "prepare", keep)
    # the paper's Adam lr 1e-4; 2 epochs of batches of 8 (5 forget + 10 retain steps each)
    report, _, model = unlearn(setup, "bad_teacher", "method.epochs=2", "method.batch_size=8")
    (random_teacher,) = teachers
    x = setup["transform"](setup["data"].forget.images)

    def kl_to_random(m, t: float) -> float:
        with torch.no_grad():
            p = F.softmax(classifier_logits(random_teacher, {"pixel_values": x}) / t, -1)
            log_q = F.log_softmax(classifier_logits(m.eval(), {"pixel_values": x}) / t, -1)
        return float(F.kl_div(log_q, p, reduction="batchmean"))

    original = original_model(setup)
    for t in (1.0, 4.0):  # seeds 0-8: after / before 0.14-0.35 (T=1), 0.12-0.32 (T=4)
        before, after = kl_to_random(original, t), kl_to_random(model, t)
        assert after < 0.5 * before, (
            f"KL_T={t}(random teacher || student) on forget {before:.3f} -> {after:.3f}"
        )
    # and away from the labels: the forget loss rises (seeds 0-8: 3.2x to 18x). The forget error need not: the
    # argmax often survives (2.5% -> 2.5% on one seed).
    before, after = mean_loss(setup, original, "forget"), mean_loss(setup, model, "forget")
    assert after > 2 * before, (before, after)
    assert list(report["losses"]) == ["forget", "retain"] and len(report["losses"]["forget"]) == 2 * 5


def test_fisher_adds_noise_by_the_rule_and_forgets_the_class(setup, monkeypatch):
    methods = []
    prepare = Fisher.prepare

    def keep(self, student, ctx):
        methods.append(self)
        prepare(self, student, ctx)

    monkeypatch.setattr(Fisher, "prepare", keep)
    # alpha 1e-8 (the authors pass 1e-6): small enough that the noise leaves this tiny net working (seeds 0-8:
    # retain error 0%), so the forget set sees the head row's wipe. At 1e-6 the noise alone moved the forget loss
    # either way (x0.3 to x147 over seeds 0-8) and sent the retain error to 37-72%.
    report, after, model = unlearn(setup, "fisher", "method.alpha=1e-8")
    (method,) = methods
    original = original_model(setup)
    before = original.state_dict()
    # the variances used are the rule applied to the Fisher of D_r, recomputed here independently
    data, transform = setup["data"], setup["transform"]
    batches = (
        {"pixel_values": transform(data.retain.images[i : i + 64])} for i in range(0, len(data.retain), 64)
    )
    fisher = fisher_diagonal(original, classifier_logits, batches, chunk_size=16)
    head = head_parameter_names(original)
    for name, p in original.named_parameters():
        _, var = fisher_mean_var(p.detach(), fisher[name], 1e-8, name in head, [0])
        assert torch.allclose(method.variance[name], var, rtol=1e-3), name
        delta = after[name] - before[name]
        if name not in head:
            assert not torch.equal(delta, torch.zeros_like(delta)), name  # every tensor perturbed
            if p.numel() >= 2000:  # (theta' - theta) / sqrt(var) is standard normal
                z = delta / var.sqrt()
                assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1, name
    # the forgotten class (airplane = 0) has a head row of pure noise around 0
    w = after["linear.weight"][0]
    # centred at 0 within 5 standard errors (seeds 0-8: at most 2.9), of the rule's spread within 30% (at most 14%)
    assert abs(float(w.mean())) < 5 * float(w.std()) / w.numel() ** 0.5, float(w.mean())
    assert float(w.std()) == pytest.approx(1e-3**0.5, rel=0.3)
    # so every airplane loses confidence in its class (seeds 0-8: all 40), and the forget loss rises far more than
    # the retain loss (seeds 0-8: at least 11x). The other rows keep their weights, and an airplane's other logits
    # are mostly below row 0's noise around 0: the class becomes uncertain (mean p 0.5-0.66), not always lost
    # (forget error 5-35%), so the forget error is no check here.
    forget = setup["data"].forget
    p_before = predict(original, forget, setup["transform"], 256, "cpu")["conf"]
    p_after = predict(model, forget, setup["transform"], 256, "cpu")["conf"]
    assert (p_after < p_before).mean() >= 0.9, (p_before, p_after)
    d_forget = mean_loss(setup, model, "forget") - mean_loss(setup, original, "forget")
    d_retain = mean_loss(setup, model, "retain") - mean_loss(setup, original, "retain")
    assert d_forget > 0 and d_forget > 3 * d_retain, (d_forget, d_retain)
    assert report["train_seconds"] >= report["prepare_seconds"] > 0
    assert [row["epoch"] for row in report["history"]] == [0] and report["losses"] == {}


def test_cf_k_refuses_a_k_larger_than_the_model(setup, capsys):
    out = setup["tmp"] / "cf_k_too_big"
    assert (
        main(["run", "configs/demo.yaml", *setup["over"], f"output_dir={out}", "method=cf_k", "method.k=12"])
        == 2
    )
    assert "k=12 but PreActResNetForImageClassification has 11 blocks" in capsys.readouterr().err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()  # refused before any work
    assert len(last_blocks(original_model(setup), 11)) == 11
