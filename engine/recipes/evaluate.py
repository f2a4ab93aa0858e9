"""`unlearn eval`: score any checkpoint of any task (and ``eval.reference`` beside it), on any backend, over one
session (session.py): the task, the reference's scores (a causal LM's forget quality and privleak are measured
against them), the model's, then the staged folder with the report, written by the main rank.

Every process evaluates (ZeRO-3 forwards are collective); the main one writes the report.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from engine.config import RunConfig
from engine.recipes.session import Session, load_frozen
from engine.tasks import build_task


def run_evaluation(cfg: RunConfig, log=print, backend=None) -> Path:
    t0 = time.perf_counter()
    session = Session(cfg, "eval", log, backend)
    backend, log, m = session.backend, session.log, cfg.model
    task = build_task(cfg, m.path)
    log(task.description)
    reference = None
    if cfg.eval.reference:  # loaded only when its cached scores miss
        reference = task.evaluate(partial(load_frozen, backend, task, cfg.eval.reference), backend.device,
                                  cache_dir=cfg.eval.reference, backend=backend)  # fmt: skip
    model = load_frozen(backend, task, m.path, m.revision, m.trust_remote_code)
    task.check(model)
    metrics = task.evaluate(model, backend.device, reference, backend=backend)
    log(f"{m.path}: {task.describe(metrics)}")
    with session.stage() as stage:
        session.report(stage, {
            "title": f"Evaluation of {m.path}", "task": task.name, "suite": task.suite, "command": "eval",
            "method": {"name": "eval", "model": m.path}, "forget": task.forget_summary(), "metrics": metrics,
            "reference": reference, "seconds": time.perf_counter() - t0,
        })  # fmt: skip
    return session.close()
