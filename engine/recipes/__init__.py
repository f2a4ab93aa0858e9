"""Commands assembled from the components: one readable, rank-aware file per command, for every task, each in
stages over one run session (session.py).

``launch(command, cfg)`` is how a command runs, for the CLI and for `unlearn request process` alike: the config's
refusals for it (engine/config/rules.py: the tasks and backends it serves, the extras, the model it needs), then
its recipe in this process, or in every Ray Train worker (engine/launch/ray_train.py, which never imports a
recipe: it runs the one it is given).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.config import check


@dataclass(frozen=True)
class Recipe:
    """``target``: "module:function" of the recipe, called as ``function(cfg, **kwargs)``."""

    target: str

    @property
    def run(self) -> Callable:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


RECIPES: dict[str, Recipe] = {
    "train": Recipe("engine.recipes.train:run_training"),
    "run": Recipe("engine.recipes.unlearn:run_unlearning"),
    "eval": Recipe("engine.recipes.evaluate:run_evaluation"),
    "audit": Recipe("engine.recipes.audit:run_audit"),
}


def launch(command: str, cfg, **kwargs) -> Path:
    """Run ``command`` on ``cfg``: refused in one line before any work when it cannot, then on its backend."""
    check(cfg, command, kwargs.get("targets"))
    recipe = RECIPES[command]
    if cfg.backend.name == "ray":
        from engine.launch.ray_train import run_on_ray

        return run_on_ray(cfg, recipe, **kwargs)
    return recipe.run(cfg, **kwargs)
