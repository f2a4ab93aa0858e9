"""`unlearn eval`: score any checkpoint on the run's splits and write its report."""

from __future__ import annotations

import time
from pathlib import Path

from engine.backends import build_backend
from engine.checkpoint.export import check_output_dir, staged_dir
from engine.config import RunConfig, dump_config
from engine.errors import ConfigError
from engine.eval.report import write_report
from engine.models.loading import load_classifier
from engine.recipes.common import Evaluator, describe, load_data_and_transform, main_log


def run_evaluation(cfg: RunConfig, log=print, backend=None) -> Path:
    """Score ``model.path`` (and ``eval.reference``) under any backend: every process evaluates (ZeRO-3
    forwards are collective), the main one writes the report."""
    t0 = time.perf_counter()
    if cfg.model.path is None:
        raise ConfigError("`unlearn eval` needs model.path: the checkpoint to score")
    check_output_dir(cfg.output_dir, cfg.overwrite)
    data, _, transform = load_data_and_transform(cfg, cfg.model.path)
    backend = backend or build_backend(cfg.backend)
    log = main_log(log, backend)

    def load(path: str, revision=None, trust_remote_code=False):
        with backend.init_context():  # under ZeRO-3 partitioned while it loads
            model = load_classifier(path, data.num_labels, revision, trust_remote_code)
        return backend.unwrap(backend.prepare_frozen(model))

    model = load(cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code)
    reference = load(cfg.eval.reference) if cfg.eval.reference else None
    with staged_dir(cfg.output_dir, cfg.overwrite, backend) as stage:
        evaluator = Evaluator(data, transform, cfg, backend.device)
        metrics = evaluator(model, attacks=True)
        ref = evaluator(reference, attacks=True) if reference is not None else None
        log(f"{cfg.model.path}: {describe(metrics)}")
        if backend.is_main:
            dump_config(cfg, stage / "config.yaml")
            _write(stage, cfg, data, metrics, ref, t0)
    backend.close()
    return Path(cfg.output_dir)


def _write(stage: Path, cfg: RunConfig, data, metrics: dict, ref: dict | None, t0: float) -> None:
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
