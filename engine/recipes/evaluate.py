"""`unlearn eval`: score any checkpoint on the run's splits and write its report."""

from __future__ import annotations

import time
from pathlib import Path

from engine.backends import build_backend
from engine.checkpoint.export import staged_dir
from engine.config import RunConfig, dump_config
from engine.errors import ConfigError
from engine.eval.report import write_report
from engine.models.loading import load_classifier
from engine.recipes.common import Evaluator, describe, load_data_and_transform, require_single


def run_evaluation(cfg: RunConfig, log=print) -> Path:
    t0 = time.perf_counter()
    if cfg.model.path is None:
        raise ConfigError("`unlearn eval` needs model.path: the checkpoint to score")
    data, _, transform = load_data_and_transform(cfg, cfg.model.path)
    require_single(cfg, "`unlearn eval`")
    backend = build_backend(cfg.backend)
    model = load_classifier(cfg.model.path, data.num_labels, cfg.model.revision, cfg.model.trust_remote_code)
    reference = load_classifier(cfg.eval.reference, data.num_labels) if cfg.eval.reference else None
    with staged_dir(cfg.output_dir, cfg.overwrite) as stage:
        dump_config(cfg, stage / "config.yaml")
        evaluator = Evaluator(data, transform, cfg, backend.device)
        metrics = evaluator(model.to(backend.device), attacks=True)
        ref = evaluator(reference.to(backend.device), attacks=True) if reference is not None else None
        log(f"{cfg.model.path}: {describe(metrics)}")
        write_report(
            stage,
            {
                "title": f"Evaluation of {cfg.model.path}",
                "command": "eval",
                "method": {"name": "eval", "model": cfg.model.path},
                "forget": data.forget_summary(),
                "metrics": metrics,
                "original": None,
                "reference": ref,
                "rewound": None,
                "history": [],
                "losses": {},
                "seconds": time.perf_counter() - t0,
                "artifacts": {},
            },
        )
    return Path(cfg.output_dir)
