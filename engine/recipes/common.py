"""Set-up shared by the recipes: seeding, the main rank's log, frozen models to score, what a report says of a backend."""

from __future__ import annotations

import random

import numpy as np
import torch


def main_log(log, backend):
    """``log`` in the main process; elsewhere a log that prints nothing (one log per run, not one per rank)."""
    return log if backend.is_main else _quiet


def _quiet(*args, **kwargs) -> None:
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_frozen(backend, task, path: str, revision: str | None = None, trust_remote_code: bool = False):
    """A model to score, not train: loaded by the task (partitioned while it loads under ZeRO-3), frozen by
    the backend, the Hugging Face module returned."""
    with backend.init_context():
        model = task.load(path, revision, trust_remote_code)
    return backend.unwrap(backend.prepare_frozen(model))


def backend_summary(backend) -> dict:
    """Where a run ran, for its report."""
    return {"name": backend.name, "world_size": backend.world_size, "zero_stage": backend.zero_stage,
            "accumulation": backend.accum}  # fmt: skip


def log_memory(log, memory: list[dict]) -> None:
    for row in memory:
        log("memory rank {rank}: peak {peak_bytes:,} B ({peak_kind}); parameters {parameter_bytes:,} B, "
            "gradients {gradient_bytes:,} B, optimizer state {optimizer_bytes:,} B".format(**row))  # fmt: skip


def training_seconds(model_dir: str | None) -> float | None:
    """How long `unlearn train` took to train the model in ``model_dir`` (its report.json's ``train_seconds``):
    the verdict's "time against retraining". None when the folder has no such report (a hub id, a model
    trained elsewhere)."""
    import json
    from pathlib import Path

    report = Path(model_dir) / "report.json" if model_dir else None
    if report is None or not report.is_file():
        return None
    try:
        value = json.loads(report.read_text()).get("train_seconds")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, int | float) else None
