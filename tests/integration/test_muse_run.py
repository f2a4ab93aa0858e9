"""The MUSE preset end to end (issue 33): `unlearn train configs/muse.yaml` (Retrain, then the Original) and
`unlearn run configs/muse.yaml` on a tiny Llama, two forget articles of the real MUSE-News copy; report.json holds
every MUSE key for the unlearned model and the Original, scored against Retrain."""

from __future__ import annotations

import json

from engine.cli import main

KEYS = ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "privleak", "privleak_muse",
        "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "extraction_strength")  # fmt: skip


def overrides(model, out, **extra) -> list[str]:
    settings = {
        "model.base": str(model), "model.path": str(model), "output_dir": str(out), "muse.forget_subset": "2",
        "muse.retain_subset": "1", "muse.max_rows": "3", "muse.max_length": "64", "muse.max_prompt_tokens": "48",
        "muse.verbmem_max_new_tokens": "6", "muse.knowmem_max_new_tokens": "6", "train.epochs": "2",
        "train.lr": "0.003", "method.epochs": "1", "method.msteps": "1", "method.lr": "0.003", "logging.progress": "false",
        "backend.num_threads": "1", "eval.batch_size": "8", **extra,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in settings.items()]


def test_a_muse_run_reports_every_muse_metric(tiny_lm, tmp_path):
    models = tmp_path / "models"
    assert (
        main(["train", "configs/muse.yaml", *overrides(tiny_lm, models, **{"eval.reference": "null"})]) == 0
    )
    assert {p.name for p in models.iterdir()} >= {"original", "retrain"}
    out = tmp_path / "run"
    args = overrides(models / "original", out, **{"eval.reference": str(models / "retrain")})
    assert main(["run", "configs/muse.yaml", *args]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["suite"] == "muse"
    for part in ("metrics", "original"):
        assert set(KEYS) <= set(r[part]), (part, set(KEYS) - set(r[part]))
        assert all(isinstance(r[part][k], float) for k in KEYS), {k: r[part][k] for k in KEYS}
    # privleak is measured against Retrain's Min-K% AUC, in both conventions
    ref = r["reference"]["mia_min_k"]
    auc = r["metrics"]["mia_min_k"]
    assert abs(r["metrics"]["privleak_muse"] - ((1 - auc) - (1 - ref)) / (1 - ref) * 100) < 1e-6
    assert r["forget"]["kind"] == "muse" and r["forget"]["articles"] == 2
    assert "Forget verbatim ROUGE-L F1 (C1)" in (out / "report.md").read_text()
