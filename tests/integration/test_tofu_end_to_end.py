"""`unlearn train | run | eval` with task=causal_lm on a tiny Llama saved and loaded by path, on real TOFU rows."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from engine.cli import main
from tests.conftest import tofu_overrides

pytestmark = pytest.mark.slow

EXPECTED = {"forget_quality", "model_utility", "forget_Q_A_ROUGE", "forget_Q_A_Prob", "privleak", "mia_min_k"}


def test_tofu_train_run_eval(tiny_lm, tmp_path):
    models = tmp_path / "models"
    assert main(["train", "configs/tofu.yaml", *tofu_overrides(tiny_lm, tmp_path, output_dir=models)]) == 0
    for target in ("original", "retain"):
        report = json.loads((models / target / "report.json").read_text())
        assert EXPECTED <= set(report["metrics"])
        assert (models / target / "tokenizer.json").is_file()
    original = json.loads((models / "original" / "report.json").read_text())["metrics"]
    assert 0 <= original["forget_quality"] <= 1
    # the original was trained on its forget set and the retain model was not: lower forget NLL
    hist_o = json.loads((models / "original" / "report.json").read_text())["history"]
    hist_r = json.loads((models / "retain" / "report.json").read_text())["history"]
    assert hist_o[-1]["forget_nll"] < hist_r[-1]["forget_nll"]

    # the original's and retain model's evaluations are cached by `train` and reused by every `run`
    cached = {t: (models / t / "tofu_eval.json").stat().st_mtime_ns for t in ("original", "retain")}
    for method in ("scrub", "grad_diff", "npo"):
        out = tmp_path / method
        extra = {
            "model.path": models / "original",
            "eval.reference": models / "retain",
            "output_dir": out,
            "method": method,
            "method.epochs": 2 if method == "scrub" else 1,
            "method.lr": 0.001,
        }
        if method == "scrub":
            extra.update({"method.msteps": 1, "method.forget_nll": 1.0, "method.rewind": "true"})
        assert main(["run", "configs/tofu.yaml", *tofu_overrides(tiny_lm, tmp_path, **extra)]) == 0
        report = json.loads((out / "report.json").read_text())
        assert EXPECTED <= set(report["metrics"]) and report["original"] and report["reference"]
        before = load_file(models / "original" / "model.safetensors")
        after = load_file(out / "model" / "model.safetensors")
        assert any(not (before[k] == after[k]).all() for k in before), f"{method} left the model unchanged"
        # forgetting relative to what is kept: the forget answers' NLL rises above the retain answers'
        gap = [h["forget_nll"] - h["retain_nll"] for h in report["history"]]
        assert gap[-1] > gap[0], f"{method}: forget-retain NLL gap {gap}"
    assert (tmp_path / "scrub" / "model_rewound" / "model.safetensors").is_file()
    # every run's receipt recognises its exported models (SCRUB: the model and the rewound one)
    assert main(["verify", str(tmp_path / "scrub"), str(tmp_path / "scrub" / "model_rewound")]) == 0
    assert main(["verify", str(tmp_path / "npo"), str(tmp_path / "npo" / "model")]) == 0
    assert cached == {t: (models / t / "tofu_eval.json").stat().st_mtime_ns for t in ("original", "retain")}

    out = tmp_path / "eval"
    args = tofu_overrides(tiny_lm, tmp_path, output_dir=out)
    args += [f"model.path={tmp_path / 'scrub' / 'model'}", f"eval.reference={models / 'retain'}"]
    assert main(["eval", "configs/tofu.yaml", *args]) == 0
    assert json.loads((out / "report.json").read_text())["metrics"]["forget_quality"] is not None


@pytest.mark.full
def test_tofu_train_resumes_each_target_bit_identically(tiny_lm, tmp_path, monkeypatch):
    """SIGTERM in epoch 2 of each target of `unlearn train`: a checkpoint and exit 75 each time; the reruns
    resume the retain model mid-epoch, then keep it (its evaluation, the original's reference, from its
    cache) and resume the original; both end with the weights of an uninterrupted run."""
    settings = {"train.epochs": 2, "tofu.num_authors": 5}
    ref = tmp_path / "ref"
    assert (
        main(["train", "configs/tofu.yaml", *tofu_overrides(tiny_lm, tmp_path, output_dir=ref, **settings)])
        == 0
    )
    out = tmp_path / "out"
    args = ["train", "configs/tofu.yaml", *tofu_overrides(tiny_lm, tmp_path, output_dir=out, **settings)]
    # the same fault every time: a resumed target is past it, so it strikes the next target's epoch 2
    monkeypatch.setenv("UNLEARN_FAULT", "step:2:step=1:do=term")
    assert [main(args) for _ in range(3)] == [75, 75, 0]
    for target in ("retain", "original"):
        report = json.loads((out / target / "report.json").read_text())
        assert report["resume"]["position"] == "epoch 2, min step 1"
        a, b = load_file(ref / target / "model.safetensors"), load_file(out / target / "model.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), target
        expected = json.loads((ref / target / "report.json").read_text())["metrics"]
        assert report["metrics"]["forget_quality"] == expected["forget_quality"]
    assert not (out / "checkpoints").exists()
