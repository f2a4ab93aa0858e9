"""The ``Task`` protocol: what the recipes call on a task (what is unlearned: image classification, causal LMs).
A task is built per run (``build_task(cfg, model_path)``); subclass ``Task`` to take the no-op hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch

from engine.methods.base import MethodContext


class Task(Protocol):
    name: str  # the config's task
    suite: str  # its evaluation suite: which metrics (engine/eval/registry.py) and report layout
    description: str  # the data, one line
    headline: tuple[str, ...]  # the metrics a model card and the log show
    train_targets: tuple[str, ...]  # what `unlearn train` makes (engine/config/rules.py)
    reference_target: str | None  # the target the others are scored against
    trained_on: dict[str, str]  # target -> its data, for the report
    calibration_measure: ClassVar[str]  # what SCRUB's calibrated schedule steers, for its log
    forward: Callable[[torch.nn.Module, dict], torch.Tensor]  # (model, batch) -> the logits a loss counts

    def forget_summary(self) -> dict: ...  # {kind, description, size, ids_sha256} of the forget set

    def streams(self, augment: bool = False, folder=None, backend=None) -> dict:
        """The forget and retain streams (``folder``: where a text task tokenizes them once, for every rank)."""
        ...

    def train_stream(self, target: str): ...  # what `unlearn train`'s ``target`` trains on

    def row_ids(self, stream: str) -> list | None: ...  # a stream's example ids in row order (shards.json)

    def load(
        self, path: str, revision: str | None = None, trust_remote_code: bool = False
    ) -> torch.nn.Module: ...

    def build(self) -> torch.nn.Module: ...  # `unlearn train`'s start: a fresh model.arch, or the checkpoint

    def save(self, model, path, title: str, settings: dict, metrics: dict, weights=None, record=None,
             forget: bool = True) -> None: ...  # fmt: skip  # a Hugging Face export with its card and record

    def evaluate(self, model, device, reference: dict | None = None, cache_dir=None, backend=None) -> dict:
        """The suite's metrics of ``model`` (or of what the function ``model`` loads: called only when a cached
        score misses), against ``reference``'s (Retrain's) where a metric needs one."""
        ...

    def history_row(
        self, model, device, epoch: int, lr, losses: dict, metrics: dict | None = None
    ) -> dict: ...

    def rewind_series(self, history: list[dict], final: dict) -> tuple[list[float], float, dict]:
        """SCRUB+R: the forget measure per epoch, its target and how the report names them."""
        ...

    def calibration(self, row: dict) -> tuple[float, float]:
        """(the forget measure, what unseen data of the same kind shows) of a history row."""
        ...

    def forget_error(self, model, device) -> float: ...  # the forget measure alone, now (eval mode)

    @staticmethod
    def describe(metrics: dict) -> str: ...  # the headline metrics in one line, for the log

    # --- hooks with defaults
    def check(self, model: torch.nn.Module) -> None:
        """Refuse, before any work, a model this task's data cannot feed (a tokenizer beyond its vocabulary)."""

    def keep_scores(self, folder, metrics: dict, reference: dict | None = None) -> None:
        """Keep ``metrics`` beside a model for later runs that score it (costly suites only)."""

    def method_context(self, backend) -> MethodContext | None:
        """What a method's ``prepare`` may use (None: no method that prepares serves this task)."""
        return None

    @classmethod
    def token_rows(cls, cfg: Any) -> tuple[Any, dict[str, list[dict]]] | None:
        """The formatter and the forget and retain rows a Ray driver tokenizes once for every worker
        (engine/launch/ray_train.py); None: nothing to tokenize (images are decoded per batch)."""
        return None


def config_key(cfg: Any, path: str | None) -> str:
    """Which config key names ``path``, for errors: eval.reference, model.base (what `unlearn train` reads in place
    of model.path when it is set) or model.path."""
    if path is not None and path == cfg.eval.reference:
        return "eval.reference"
    return cfg.model._path_key if path is not None and path == cfg.model.path else "model.path"
