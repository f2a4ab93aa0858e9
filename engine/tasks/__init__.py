"""Tasks: what the engine unlearns. A task says how rows become streams, how a model is loaded, built and
exported, what its forward returns, and how it is evaluated; the recipes (one per command) do the rest the
same way for every task and backend.

- ``image_classification``: any ``AutoModelForImageClassification`` checkpoint and the paper's CIFAR nets
  (engine/tasks/image_classification.py).
- ``causal_lm``: any ``AutoModelForCausalLM`` checkpoint; TOFU is its dataset preset and evaluation suite
  on any text data (raw documents or prompt/answer pairs) or its TOFU preset (``data.preset=tofu``, the
  ``tofu`` section; engine/tasks/causal_lm.py).

A task object is built per run (``build_task(cfg, model_path)``) and offers:
``description``, ``suite`` (its evaluation suite: which report layout), ``forget_summary()``,
``forward(model, batch) -> logits``, ``streams(augment)`` (forget and retain), ``train_stream(target)``,
``targets(cfg)`` / ``train_targets`` (``unlearn train``'s models, in the order they are made) and
``reference_target`` (the one the others are scored against, or None), ``load(path, revision,
trust_remote_code)``, ``build()`` (from scratch), ``check(model)``, ``evaluate(model, device, reference,
cache_dir, backend)`` (``model`` may be a function that loads it: called only when a cached score
misses), ``history_row(model, device, epoch, lr, losses, metrics)``, ``rewind_series(history, final)``
(SCRUB+R's per-epoch forget series and its target), ``calibration(row)`` and ``forget_error(model,
device)`` (SCRUB's calibrated schedule: the forget measure and what unseen data shows; the measure alone),
``save(...)``, ``describe(metrics)``,
``method_context(backend)`` (for a method's ``prepare``), ``row_ids(stream)``.

This module imports nothing heavy: the config reads ``PROVIDES`` to refuse a method a task cannot serve.
"""

from __future__ import annotations

import importlib

# What each task can give a method (engine/methods: each method's ``needs``): a frozen teacher, a paired
# forget+retain stream, a classifier head (class-level logits a method edits or reads per class).
PROVIDES: dict[str, tuple[str, ...]] = {
    "image_classification": ("teacher", "paired", "classifier_head"),
    "causal_lm": ("teacher", "paired"),
}
TARGETS = {
    "image_classification": "engine.tasks.image_classification:ImageClassification",
    "causal_lm": "engine.tasks.causal_lm:CausalLM",
}
# names the configs of earlier versions used: still read, as these
ALIASES = {"vision": "image_classification", "tofu": "causal_lm"}


def task_class(name: str):
    module, cls = TARGETS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(cfg, model_path: str | None):
    """The task of ``cfg`` for a run that starts from ``model_path`` (its image settings or tokenizer)."""
    return task_class(cfg.task)(cfg, model_path)
