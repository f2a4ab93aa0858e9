"""`unlearn run` with SCRUB's calibrated schedule (and SCRUB+R) on real CIFAR-10 images, in seconds: the
max phase spends its step budget (the 40-image forget set cycled), checked every CHECK max-steps, until the
forget error reaches its target, and no max-step while it holds; the report's history and checks say so,
SCRUB+R aims at the same target, and a run stopped inside a cycled max phase resumes to the same decisions and
the same weights."""

from __future__ import annotations

import json

import pytest

from engine.cli import main
from engine.testing import tiny_overrides

pytestmark = pytest.mark.slow

BUDGET, TOLERANCE, CHECK = (
    5,
    1.0,
    2,
)  # 40 forget images in batches of 16: 3 batches a pass, 5 steps cycle them


@pytest.fixture(scope="module")
def trained(tiny_cifar, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibrated")
    # an original that knows airplanes, so that it starts far below the 100% target (seeds 0-5: 5-35% forget
    # error): 2 epochs at lr 0.05 with augmentation left some seeds predicting no airplane at all, already at the
    # target, with no max phase to check. Retrain is not needed (eval.reference=null).
    over = tiny_overrides(tiny_cifar, tmp, **{"forget.label": "airplane", "train.epochs": "6", "train.lr": "0.01",
                                              "train.augment": "false", "train.batch_size": "16",
                                              "train.lr_decay_epochs": "[4]", "output_dir": str(tmp / "models")})  # fmt: skip
    assert main(["train", "configs/demo.yaml", *over, "--only", "original"]) == 0
    run = [*over, f"model.path={tmp / 'models' / 'original'}", "eval.reference=null",
           "method.schedule=calibrated", "method.epochs=4", "method.msteps=3",
           f"method.max_steps_per_epoch={BUDGET}", f"method.target_tolerance={TOLERANCE}", "method.lr=0.01",
           f"method.check_every={CHECK}",
           "method.rewind=true"]  # fmt: skip
    assert main(["run", "configs/demo.yaml", *run, f"output_dir={tmp / 'run'}"]) == 0
    return tmp, run


def test_max_steps_stop_once_the_forget_error_reaches_its_target(trained):
    tmp, _ = trained
    report = json.loads((tmp / "run" / "report.json").read_text())
    history = report["history"][1:]  # epoch 0 is the original
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    # a whole class forgotten: the target is 100% (a model that never saw airplanes cannot name one)
    assert all(r["target_error"] == 100.0 for r in report["history"])
    assert report["history"][0]["max_open"]  # the original is far from it
    reached = [r["epoch"] for r in history if r["target_reached"]]
    assert reached and reached[0] <= 3, "the run never reached its target: the rule below would prove little"
    checks = report["schedule_checks"]
    for before, r in zip(report["history"], history):
        # the rule, epoch by epoch: a max phase in epochs 1..msteps that start below the target, of the whole
        # budget unless a check (after every CHECK max-steps, not the last) found the target reached
        mine = [c for c in checks if c["epoch"] == r["epoch"]]
        ended = [c["step"] for c in mine if c["ended"]]
        budget = BUDGET if r["epoch"] <= 3 and before["max_open"] else 0
        assert r["max_steps"] == (ended[0] if ended else budget), (r, mine)
        assert [c["step"] for c in mine] == list(range(CHECK, r["max_steps"] + 1 - (not ended), CHECK))
        assert all(c["ended"] == (c["forget_error"] >= 100.0 - TOLERANCE) for c in mine), mine
        assert all(0 < c["seconds"] < report["train_seconds"] for c in mine), mine  # each check's own cost
        assert (
            r["target_reached"] == (r["forget_error"] >= 100.0 - TOLERANCE)
            and r["max_open"] != r["target_reached"]
        )
        assert (r["max_loss"] is None) == (r["max_steps"] == 0), r
    spent = sum(r["max_steps"] for r in history)
    assert len(report["losses"]["max"]) == spent == history[-1]["max_steps_spent"]  # as the loop logged them
    # SCRUB+R rewinds towards the same target
    assert report["rewound"]["steered_by"] == "target_error"
    assert report["rewound"]["target_error"] == 100.0
    md = (tmp / "run" / "report.md").read_text()
    assert "target_error | max_steps" in md
    spent_checking = sum(c["seconds"] for c in checks)
    assert f"Checks inside max phases: {len(checks)}, {spent_checking:.1f} s of the training's" in md


def test_a_run_stopped_inside_a_cycled_max_phase_resumes_to_the_same_decisions(trained, monkeypatch):
    tmp, run = trained
    out = f"output_dir={tmp / 'resumed'}"
    monkeypatch.setenv("UNLEARN_FAULT", "step:1:step=4:do=term")  # SIGTERM at max-step 4: the second pass
    assert main(["run", "configs/demo.yaml", *run, out]) == 75  # a checkpoint there, then exit
    monkeypatch.delenv("UNLEARN_FAULT")
    assert main(["run", "configs/demo.yaml", *run, out]) == 0  # the same command resumes
    resumed = json.loads((tmp / "resumed" / "report.json").read_text())
    whole = json.loads((tmp / "run" / "report.json").read_text())
    assert resumed["resume"]["position"] and "step 4" in resumed["resume"]["position"]
    keys = ("epoch", "forget_error", "target_error", "max_steps", "target_reached", "max_open")
    decisions = [[{k: r[k] for k in keys} for r in rep["history"]] for rep in (resumed, whole)]
    assert decisions[0] == decisions[1]
    untimed = [
        [{k: v for k, v in c.items() if k != "seconds"} for c in rep["schedule_checks"]]
        for rep in (resumed, whole)
    ]
    assert untimed[0] == untimed[1]
    for name in ("model", "model_rewound"):
        after = (tmp / "resumed" / name / "model.safetensors").read_bytes()
        assert after == (tmp / "run" / name / "model.safetensors").read_bytes(), name
