"""Tasks: what the engine unlearns. A task says how rows become streams, how a model is loaded, built and
exported, what its forward returns and how a model is scored; the recipes (one per command) do the rest the same
way for every task and backend. The protocol, with its hooks: base.py (``Task``).

- ``image_classification``: any ``AutoModelForImageClassification`` checkpoint and the paper's CIFAR nets
  (image_classification.py).
- ``causal_lm``: any ``AutoModelForCausalLM`` checkpoint on any text data (raw documents or prompt/answer pairs),
  or TOFU, its preset (``data.preset=tofu``; causal_lm.py).

What each task gives a method is the config's to check (engine/config/rules.py: PROVIDES); this module imports
a task's module only when it is built.
"""

from __future__ import annotations

import importlib

from engine.tasks.base import Task

TASKS = {
    "image_classification": "engine.tasks.image_classification:ImageClassification",
    "causal_lm": "engine.tasks.causal_lm:CausalLM",
}


def task_class(name: str) -> type[Task]:
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(cfg, model_path: str | None) -> Task:
    """The task of ``cfg`` for a run that starts from ``model_path`` (its image settings or tokenizer)."""
    return task_class(cfg.task)(cfg, model_path)


__all__ = ["TASKS", "Task", "build_task", "task_class"]
