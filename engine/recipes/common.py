"""Set-up shared by the recipes: data, backend, transform and the per-epoch evaluation hook."""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from engine.data.vision import ImageTransform, prepare_data
from engine.eval.metrics import evaluate
from engine.models.loading import image_settings


def main_log(log, backend):
    """``log`` in the main process; elsewhere a log that prints nothing (one log per run, not one per rank)."""
    return log if backend.is_main else _quiet


def _quiet(*args, **kwargs) -> None:
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Evaluator:
    """Scores a model on every split of ``data`` and keeps the per-epoch history."""

    def __init__(self, data, transform, cfg, device, tracker=None):
        self.data, self.transform, self.cfg, self.device, self.tracker = data, transform, cfg, device, tracker
        self.history: list[dict] = []

    def __call__(self, model, attacks: bool = False) -> dict:
        return evaluate(
            model,
            self.data,
            self.transform,
            self.cfg.eval.batch_size,
            self.device,
            attacks=attacks,
            seed=self.cfg.eval.mia_seed,
        )

    def training_seconds(self, loop_seconds: float, since: int = 1) -> float:
        """``loop_seconds`` less the per-epoch evaluations the epoch hook ran inside the loop (from epoch
        ``since`` on: a resumed run's loop began there)."""
        return loop_seconds - sum(r["eval_seconds"] for r in self.history if r["epoch"] >= since)

    def record(
        self, epoch: int, model, lr: float | None, losses: dict[str, float], metrics: dict | None = None
    ) -> dict:
        """Append one history row; ``metrics`` already computed for this model are reused, not recomputed."""
        t = time.perf_counter()
        row = {
            "epoch": epoch,
            "lr": lr,
            **(metrics if metrics is not None else self(model)),
            "max_loss": losses.get("max"),
            "min_loss": losses.get("min"),
        }
        row["eval_seconds"] = time.perf_counter() - t
        self.history.append(row)
        if self.tracker:
            self.tracker.log({k: v for k, v in row.items() if v is not None}, step=epoch)
        return row


def load_data_and_transform(cfg, model_path: str | None):
    data = prepare_data(cfg.data, cfg.forget)
    image = image_settings(model_path, cfg.data.mean, cfg.data.std, cfg.data.image_size)
    return data, image, ImageTransform(image["mean"], image["std"], image["size"])


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the weights (SCRUB+R's per-epoch snapshots); tied tensors become separate
    copies, which safetensors requires."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


def describe(metrics: dict) -> str:
    keys = ("forget_error", "retain_error", "test_error", "val_error", "mia", "mia_efficacy")
    return "  ".join(f"{k}={metrics[k]:.2f}" for k in keys if k in metrics)
