"""Commands assembled from the components: one readable, rank-aware file per command, for every task.

``recipe_for(command, cfg)`` reads the one table from a command to its recipe and, per task, the backends
it runs on; the CLI reads it, refuses any other backend there (before any work), and hands the recipe to
the launcher that starts it: in this process, or in every Ray Train worker (engine/launchers/ray_train.py,
which never imports a recipe: it runs the one it is given).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import ConfigError

ALL = ("single", "deepspeed", "ray")


@dataclass(frozen=True)
class Recipe:
    """``target``: "module:function" of the recipe, called as ``function(cfg, **kwargs)``. ``backends``:
    task -> the backend names it runs on (a task absent: the command does not serve it)."""

    target: str
    backends: dict[str, tuple[str, ...]]

    @property
    def run(self) -> Callable:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


RECIPES: dict[str, Recipe] = {
    "train": Recipe("engine.recipes.train:run_training",
                    {"image_classification": ("single", "deepspeed"), "causal_lm": ("single", "deepspeed")}),
    "run": Recipe("engine.recipes.unlearn:run_unlearning", {"image_classification": ALL, "causal_lm": ALL}),
    "eval": Recipe("engine.recipes.evaluate:run_evaluation", {"image_classification": ALL, "causal_lm": ALL}),
    # the audit's K unlearnings and K retrains are Ray tasks of one process each (audit.ray_address)
    "audit": Recipe("engine.recipes.audit:run_audit", {"image_classification": ("single",)}),
}  # fmt: skip


# What an optional dependency serves -> (the modules it needs, the extra that installs them: pyproject.toml).
EXTRAS = {
    "backend.name=deepspeed": (("deepspeed",), "deepspeed"),
    "backend.name=ray": (("ray", "deepspeed"), "ray"),
    "`unlearn audit`": (("ray",), "ray"),
    "logging.wandb=true": (("wandb",), "wandb"),
}


def require_extras(command: str, cfg) -> None:
    """Refuse, in one line and before any work, a config that needs an optional dependency not installed."""
    asked = [
        ("backend.name=" + cfg.backend.name) if cfg.backend.name != "single" else None,
        "`unlearn audit`" if command == "audit" else None,
        "logging.wandb=true" if cfg.logging.wandb else None,
    ]
    for use in filter(None, asked):
        modules, extra = EXTRAS[use]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            how = (
                " (after torch: DS_BUILD_OPS=0 pip install --no-build-isolation ...)"
                if "deepspeed" in missing
                else ""
            )
            raise ConfigError(
                f"{use} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: pip install 'engine[{extra}]'{how}"
            )


def recipe_for(command: str, cfg) -> Recipe:
    """The recipe of ``command``; a task it does not serve, a backend it does not run on or an optional
    dependency that is missing is refused here."""
    recipe = RECIPES[command]
    backends = recipe.backends.get(cfg.task)
    if backends is None:
        raise ConfigError(
            f"`unlearn {command}` runs with task={' or task='.join(recipe.backends)}, not task={cfg.task}"
        )
    if cfg.backend.name not in backends:
        others = [c for c, r in RECIPES.items() if cfg.backend.name in r.backends.get(cfg.task, ())]
        raise ConfigError(
            f"`unlearn {command}` of task={cfg.task} runs on backend.name={' or '.join(backends)}; "
            f"backend.name={cfg.backend.name} runs `unlearn {'|'.join(others) or '(no command)'}` of task={cfg.task}"
        )
    require_extras(command, cfg)
    return recipe
