"""Membership-inference attacks and the run report: behaviour on inputs whose answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine.eval.attacks import basic_mia, mia_efficacy, min_mia_group_size
from engine.eval.report import write_report


def _losses(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    return rng.exponential(scale, size=n)


# ---------------------------------------------------------------- basic_mia


def test_basic_mia_separable_groups_are_recognised() -> None:
    rng = np.random.default_rng(0)
    members = rng.uniform(0.0, 1e-3, size=200)  # memorised: loss ~ 0
    nonmembers = rng.uniform(3.0, 6.0, size=200)  # unseen: large loss
    assert basic_mia(members, nonmembers, seed=0) >= 0.99


def test_basic_mia_same_distribution_is_chance() -> None:
    rng = np.random.default_rng(1)
    score = basic_mia(_losses(rng, 500), _losses(rng, 500), seed=0)
    assert 0.35 <= score <= 0.65


@pytest.mark.parametrize("n_members, n_nonmembers", [(1000, 50), (50, 1000)])
def test_basic_mia_balances_unequal_groups(n_members: int, n_nonmembers: int) -> None:
    # Without balancing, always answering the majority class would score 1000/1050 ~ 0.95.
    rng = np.random.default_rng(2)
    score = basic_mia(_losses(rng, n_members), _losses(rng, n_nonmembers), seed=3)
    assert 0.35 <= score <= 0.65


def test_basic_mia_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(4)
    members, nonmembers = _losses(rng, 300, 0.8), _losses(rng, 120, 1.2)
    assert basic_mia(members, nonmembers, seed=7) == basic_mia(members, nonmembers, seed=7)
    scores = {basic_mia(members, nonmembers, seed=s) for s in range(6)}
    assert len(scores) > 1  # the seed really drives the subsample and the splits


def test_basic_mia_handles_infinite_losses() -> None:
    # p_y == 0 gives an infinite loss; the authors clip the feature to [-100, 100].
    members = np.zeros(30)
    nonmembers = np.full(30, np.inf)
    assert basic_mia(members, nonmembers) == 1.0


def test_basic_mia_rejects_small_or_invalid_groups() -> None:
    minimum = min_mia_group_size(5)
    assert minimum == 10
    ok = np.linspace(0.1, 1.0, minimum)
    assert 0.0 <= basic_mia(ok, ok + 5.0) <= 1.0
    with pytest.raises(ValueError, match="at least 10 members"):
        basic_mia(ok[:-1], ok + 5.0)
    with pytest.raises(ValueError, match="non-members"):
        basic_mia(ok, ok[:3])
    with pytest.raises(ValueError, match="NaN"):
        basic_mia(np.append(ok, np.nan), ok)
    assert min_mia_group_size(2) == 6  # sklearn's floor: one example per class in the 10% held-out part
    with pytest.raises(ValueError):
        min_mia_group_size(0)


# ---------------------------------------------------------------- mia_efficacy


def _retain_test_conf(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    retain = rng.uniform(0.9, 1.0, size=2000)  # members: confident on the true label
    test = rng.uniform(0.0, 0.6, size=400)  # non-members: much less so
    return retain, test


def test_mia_efficacy_high_when_forget_looks_like_test() -> None:
    rng = np.random.default_rng(5)
    retain, test = _retain_test_conf(rng)
    assert mia_efficacy(retain, test, rng.uniform(0.0, 0.6, size=300), seed=0) >= 0.95


def test_mia_efficacy_low_when_forget_looks_like_retain() -> None:
    rng = np.random.default_rng(6)
    retain, test = _retain_test_conf(rng)
    assert mia_efficacy(retain, test, rng.uniform(0.9, 1.0, size=300), seed=0) <= 0.05


def test_mia_efficacy_is_deterministic_and_validates() -> None:
    rng = np.random.default_rng(7)
    retain, test = rng.uniform(0.3, 1.0, 800), rng.uniform(0.0, 0.8, 200)
    forget = rng.uniform(0.0, 1.0, 100)
    assert mia_efficacy(retain, test, forget, seed=1) == mia_efficacy(retain, test, forget, seed=1)
    with pytest.raises(ValueError, match="non-empty forget_conf"):
        mia_efficacy(retain, test, [])
    with pytest.raises(ValueError, match="NaN"):
        mia_efficacy(retain, [np.nan, 0.5], forget)


# ---------------------------------------------------------------- write_report


def _report(**overrides: object) -> dict:
    report = {
        "title": "SCRUB unlearning of class 0 (airplane)",
        "command": "run",
        "method": {"name": "SCRUB", "alpha": 0.001, "gamma": 0.99, "msteps": 2, "lr": 0.0005},
        "forget": {"kind": "class", "description": "every train example of class 0", "size": 4000, "ids_sha256": "ab" * 32},
        "metrics": {"forget_error": 99.75, "retain_error": 1.25, "test_error": 12.5, "val_error": 13.0,
                    "mia": 50.5, "mia_efficacy": float("nan")},
        "original": {"forget_error": 0.5, "retain_error": 0.4, "test_error": 11.0, "val_error": 11.5,
                     "mia": 74.25, "mia_efficacy": 2.0},
        "reference": {"forget_error": 100.0, "retain_error": 0.9, "test_error": 12.0, "val_error": 12.5,
                      "mia": 49.5, "mia_efficacy": 100.0},
        "rewound": {"epoch": 1, "target_error": 88.0, "forget_errors": [0.5, 87.0, 99.75],
                    "metrics": {"forget_error": 87.0, "retain_error": 1.1, "test_error": 12.25, "val_error": 12.75,
                                "mia": 55.0, "mia_efficacy": 80.0}},
        "history": [
            {"epoch": 0, "lr": None, "forget_error": 0.5, "retain_error": 0.4, "test_error": 11.0,
             "val_error": 11.5, "max_loss": None, "min_loss": None},
            {"epoch": 1, "lr": 5e-4, "forget_error": 87.0, "retain_error": 1.1, "test_error": 12.25,
             "val_error": 12.75, "max_loss": 0.8, "min_loss": 0.3},
            {"epoch": 2, "lr": 5e-4, "forget_error": 99.75, "retain_error": 1.25, "test_error": 12.5,
             "val_error": 13.0, "max_loss": 1.4, "min_loss": 0.2},
        ],
        "losses": {"max": [0.1, 0.5, 0.9, float("inf")], "min": [0.4, 0.3, 0.25, 0.2]},
        "seconds": 125.5,
        "artifacts": {"model": "model.safetensors"},
    }  # fmt: skip
    report.update(overrides)
    return report


def test_write_report_full(tmp_path) -> None:
    report = _report()
    write_report(tmp_path, report)

    data = json.loads((tmp_path / "report.json").read_text())
    assert data["metrics"]["mia_efficacy"] is None  # NaN -> null
    assert data["losses"]["max"][-1] is None  # inf -> null
    assert data["metrics"]["forget_error"] == 99.75
    assert data["history"] == report["history"]
    assert data["rewound"] == report["rewound"]
    assert data["forget"] == report["forget"]

    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# SCRUB unlearning of class 0 (airplane)")
    header = next(line for line in md.splitlines() if line.startswith("| Metric"))
    assert header == "| Metric | Original | SCRUB | SCRUB+R (epoch 1) | Retrain |"
    forget_row = next(line for line in md.splitlines() if line.startswith("| Forget error"))
    assert forget_row == "| Forget error (%) | 0.50 | 99.75 | 87.00 | 100.00 |"
    efficacy_row = next(line for line in md.splitlines() if line.startswith("| MIA-efficacy"))
    assert efficacy_row.split(" | ")[2] == "–"  # the NaN is shown as missing
    assert "74.25" in md and "49.50" in md and "ab" * 32 in md and "every train example of class 0" in md
    assert "| msteps | 2 |" in md
    assert "![Errors per epoch](plots/errors.png)" in md
    assert "![Losses per step](plots/losses.png)" in md
    assert "[model.safetensors](model.safetensors)" in md
    assert "125.5 s (0 h 2 min 6 s)" in md

    for name in ("errors.png", "losses.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_write_report_without_reference_rewound_or_losses(tmp_path) -> None:
    report = _report(reference=None, rewound=None, original=None, losses={})
    del report["artifacts"]
    write_report(tmp_path / "new" / "run", report)
    run = tmp_path / "new" / "run"

    assert json.loads((run / "report.json").read_text())["reference"] is None
    md = (run / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Metric"))
    assert header == "| Metric | SCRUB |"
    assert "Avg. gap" not in md and "losses.png" not in md
    assert (run / "plots" / "errors.png").exists()
    assert not (run / "plots" / "losses.png").exists()


def test_write_report_gap_to_retrain_and_overwrite(tmp_path) -> None:
    report = _report()
    report["metrics"]["mia_efficacy"] = 90.0
    write_report(tmp_path, report)
    write_report(tmp_path, report)  # a second write replaces the first cleanly
    md = (tmp_path / "report.md").read_text()
    gap_row = next(line for line in md.splitlines() if line.startswith("| Avg. gap"))
    # |99.75-100| + |1.25-0.9| + |12.5-12| + |90-100| = 11.1, over 4 = 2.775
    expected = (0.25 + 0.35 + 0.5 + 10.0) / 4
    assert float(gap_row.split(" | ")[2]) == pytest.approx(expected, abs=0.006)
    assert gap_row.endswith("| 0.00 |")  # Retrain against itself
    assert not math.isnan(json.loads((tmp_path / "report.json").read_text())["metrics"]["mia_efficacy"])


@pytest.mark.parametrize(
    "forget, test, forgotten, kept",
    [(99.75, 12.5, "**Forgotten: yes.**", "**Utility kept: yes.**"),  # 0.25 from Retrain, 1.5 worse
     (78.0, 12.5, "**Forgotten: not fully.**", "**Utility kept: yes.**"),  # 22 points short of Retrain
     (100.0, 13.5, "**Forgotten: yes.**", "**Utility kept: no.**"),  # 2.5 points worse than the Original
     (100.0, 4.0, "**Forgotten: yes.**", "**Utility kept: yes.**")],  # better than before: kept
)  # fmt: skip
def test_report_opens_with_a_three_line_verdict(tmp_path, forget, test, forgotten, kept) -> None:
    report = _report(train_seconds=30.0, reference_seconds=120.0)
    report["metrics"] = {**report["metrics"], "forget_error": forget, "test_error": test}
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[:3] == ["# SCRUB unlearning of class 0 (airplane)", "", "## Verdict"]
    lines = md[4:7]
    assert lines[0].startswith(
        f"- {forgotten} The model now gets {forget:.1f}% of the forgotten examples wrong"
    )
    assert lines[1].startswith(f"- {kept} Test error {test:.1f}% against 11.0% before unlearning")
    assert lines[2] == (
        "- **Time: 0.25 of retraining.** Unlearning took 30 s; retraining from scratch without the forgotten data "
        "took 120 s."
    )
    assert md[7] == ""
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] == [line[2:] for line in lines]


def test_no_verdict_without_a_reference_and_over_forgetting_is_named(tmp_path) -> None:
    write_report(tmp_path, _report(reference=None))
    assert "## Verdict" not in (tmp_path / "report.md").read_text()
    text = _report(suite="text", metrics={"forget_nll": 4.0, "retain_nll": 1.0}, original={"retain_nll": 1.2},
                   reference={"forget_nll": 3.0}, train_seconds=10.0)  # fmt: skip
    write_report(tmp_path, text)
    verdict = json.loads((tmp_path / "report.json").read_text())["verdict"]
    assert verdict[0].startswith(
        "**Forgotten: yes, more than retraining would (over-forgotten).** Loss on the"
    )
    assert verdict[1].startswith("**Utility kept: yes.** Loss on the kept text 1.000 against 1.200")
    assert verdict[2] == "**Time:** unlearning took 10 s (the retrained model's time is not recorded)."
