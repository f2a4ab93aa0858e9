"""`unlearn eval`: score any checkpoint of any task (and ``eval.reference`` beside it), on any backend.

Every process evaluates (ZeRO-3 forwards are collective); the main one writes the report. The reference is
scored first: a causal LM's forget quality and privleak are measured against it.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from engine.backends import build_backend
from engine.checkpoint.export import check_output_dir, staged_dir
from engine.config import RunConfig, dump_config
from engine.errors import ConfigError
from engine.eval.report import write_report
from engine.recipes.common import backend_summary, load_frozen, main_log
from engine.tasks import build_task


def run_evaluation(cfg: RunConfig, log=print, backend=None) -> Path:
    t0 = time.perf_counter()
    if cfg.model.path is None:
        raise ConfigError("`unlearn eval` needs model.path: the checkpoint to score")
    check_output_dir(cfg.output_dir, cfg.overwrite)
    backend = backend or build_backend(cfg.backend)
    log = main_log(log, backend)
    task = build_task(cfg, cfg.model.path)
    log(task.description)

    reference = None
    if cfg.eval.reference:  # loaded only when its cached scores miss
        reference = task.evaluate(partial(load_frozen, backend, task, cfg.eval.reference), backend.device,
                                  cache_dir=cfg.eval.reference, backend=backend)  # fmt: skip
    model = load_frozen(backend, task, cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code)
    task.check(model)
    metrics = task.evaluate(model, backend.device, reference, backend=backend)
    log(f"{cfg.model.path}: {task.describe(metrics)}")
    with staged_dir(cfg.output_dir, cfg.overwrite, backend) as stage:
        if backend.is_main:
            dump_config(cfg, stage / "config.yaml")
            write_report(
                stage,
                {
                    "title": f"Evaluation of {cfg.model.path}",
                    "task": task.name,
                    "suite": task.suite,
                    "command": "eval",
                    "method": {"name": "eval", "model": cfg.model.path},
                    "forget": task.forget_summary(),
                    "metrics": metrics,
                    "reference": reference,
                    "seconds": time.perf_counter() - t0,
                    "backend": backend_summary(backend),
                },
            )
    backend.close()
    return Path(cfg.output_dir)
