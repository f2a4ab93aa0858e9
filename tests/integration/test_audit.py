"""`unlearn audit` end to end on real CIFAR-10 images with K=2 per side, as Ray tasks on the session's
Ray head node: the references are trained once and reused by a second audit of another method."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.testing import ray_env, tiny_overrides
from tests.conftest import ROOT as REPO

pytestmark = pytest.mark.slow


def _unlearn(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "engine.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.full
def test_audit_k2_scores_every_forget_example_and_reuses_its_references(tiny_cifar, tmp_path, ray_head):
    over = tiny_overrides(tiny_cifar, tmp_path, **{
        "forget.kind": "selective", "forget.label": "airplane", "forget.count": "12",
        "model.path": str(tmp_path / "models" / "original"), "audit.k": "2", "audit.seed": "5",
        "audit.cache_dir": str(tmp_path / "refs"), "train.epochs": "3", "audit.ray_address": ray_head["address"],
    })  # fmt: skip
    proc = _unlearn(
        "train", "configs/demo.yaml", *over, f"output_dir={tmp_path / 'models'}", "--only", "original"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = _unlearn("audit", "configs/demo.yaml", *over, f"output_dir={tmp_path / 'audit_scrub'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "audit_scrub"
    result = json.loads((out / "audit.json").read_text())
    assert result["k"] == 2 and result["seeds"] == [5, 6]
    assert len(result["examples"]) == 12 and sum(result["epsilon_histogram"].values()) == 12
    # the score is F x the two utility ratios, and F is the mean of 2 / 2^bin over the examples
    bins = np.array([e["bin"] for e in result["examples"]])
    assert result["forgetting_quality"] == pytest.approx(np.mean(2.0 / 2.0**bins))
    u, r = result["utility"]["unlearned"], result["utility"]["retrained"]
    assert result["retain_ratio"] == pytest.approx(u["retain_acc"] / r["retain_acc"])
    assert result["score"] == pytest.approx(
        result["forgetting_quality"] * result["retain_ratio"] * result["test_ratio"]
    )
    # worst first; JSON null = infinite (perfectly separable, and flagged as such)
    eps = [float("inf") if w["separable"] else w["epsilon"] for w in result["worst"]]
    assert eps == sorted(eps, reverse=True) and len(eps) == 10
    assert all((w["epsilon"] is None) == w["separable"] for w in result["worst"])
    assert result["lira"] is None  # LiRA scores each retrained model against the other K-1: needs K >= 3
    assert 0.0 < result["null_forgetting_quality"] < 1.0
    assert result["cache"] == {**result["cache"], "reused": 0, "trained": 2}
    assert {p.name for p in (out / "unlearned").iterdir()} == {"seed_5", "seed_6"}
    assert (out / "audit.md").read_text().count("|") > 20 and (out / "epsilon_histogram.png").exists()
    refs = sorted(p.name for p in Path(result["cache"]["dir"]).iterdir() if p.is_dir())
    assert refs == ["retrain_seed5", "retrain_seed6"]
    # a retrained reference never saw the forget set; the unlearnings started from the Original
    retrained = json.loads((Path(result["cache"]["dir"]) / "retrain_seed5" / "stats.json").read_text())
    assert retrained["kind"] == "retrain" and len(retrained["margin"]) == 12

    # a second method reuses the references: nothing retrained, the same reference statistics (SCRUB's keys left
    # out: method= is applied before every method.* override, which then must be the new method's)
    scrub_free = [o for o in over if not o.startswith("method.")]
    proc = _unlearn("audit", "configs/demo.yaml", *scrub_free, f"output_dir={tmp_path / 'audit_ft'}",
                    "method=finetune", "method.epochs=1")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    second = json.loads((tmp_path / "audit_ft" / "audit.json").read_text())
    assert second["cache"]["reused"] == 2 and second["cache"]["trained"] == 0
    assert second["utility"]["retrained"] == result["utility"]["retrained"]
    assert second["method"]["name"] == "finetune"


def test_audit_refuses_a_checkpoint_without_its_architecture(tiny_cifar, tmp_path):
    over = tiny_overrides(tiny_cifar, tmp_path, **{"model.arch": "null", "model.path": str(tmp_path)})
    proc = _unlearn("audit", "configs/demo.yaml", *over, timeout=300)
    assert proc.returncode != 0 and "set model.arch" in proc.stderr
