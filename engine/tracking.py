"""Metrics to Weights & Biases when asked for (offline by default: works with no network)."""

from __future__ import annotations

import os
from pathlib import Path


class Tracker:
    def __init__(self, logging_cfg, run_dir: Path, name: str, config: dict):
        self.run = None
        if not logging_cfg.wandb:
            return
        try:
            import wandb
        except ImportError as exc:
            from engine.errors import ConfigError

            raise ConfigError(
                "logging.wandb=true needs the wandb package: pip install 'engine[wandb]'"
            ) from exc
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=logging_cfg.wandb_project,
            name=name,
            dir=str(run_dir),
            mode=logging_cfg.wandb_mode,
            config=config,
        )

    def log(self, values: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
