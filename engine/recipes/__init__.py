"""Commands assembled from the components: one readable file per command.

``recipe_for(command, cfg)`` is the one table from a command and a task to its recipe and the backends it
runs on; the CLI reads it, refuses any other backend there (before any work), and hands the recipe to
the launcher that starts it: in this process, or in every Ray Train worker (engine/launchers/ray_train.py,
which never imports a recipe: it runs the one it is given).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """``target``: "module:function" of the recipe, called as ``function(cfg, **kwargs)``. ``backends``:
    the backend names it runs on. ``token_rows``: "module:function" giving, for a task of text, the
    forget and retain rows a Ray driver tokenizes once for its workers (``token_rows(cfg)`` ->
    ``(formatter, {stream: (rows, encoded rows)})``); None where the recipe cannot run on Ray."""

    target: str
    backends: tuple[str, ...] = ("single",)
    token_rows: str | None = None

    @property
    def run(self) -> Callable:
        return _resolve(self.target)

    def rows(self, cfg):
        return _resolve(self.token_rows)(cfg)


def _resolve(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


RECIPES: dict[tuple[str, str], Recipe] = {
    ("train", "vision"): Recipe("engine.recipes.train:run_training"),
    ("run", "vision"): Recipe("engine.recipes.unlearn:run_unlearning", ("single", "deepspeed", "ray")),
    ("eval", "vision"): Recipe("engine.recipes.evaluate:run_evaluation", ("single", "deepspeed", "ray")),
    # the audit's K unlearnings and K retrains are Ray tasks of one process each (audit.ray_address)
    ("audit", "vision"): Recipe("engine.recipes.audit:run_audit"),
    ("train", "tofu"): Recipe("engine.recipes.tofu:run_tofu_training", ("single", "deepspeed")),
    ("run", "tofu"): Recipe(
        "engine.recipes.tofu:run_tofu_unlearning",
        ("single", "deepspeed", "ray"),
        token_rows="engine.recipes.tofu:token_rows",
    ),
    ("eval", "tofu"): Recipe(
        "engine.recipes.tofu:run_tofu_eval", ("single", "deepspeed", "ray"), "engine.recipes.tofu:token_rows"
    ),
}


def recipe_for(command: str, cfg) -> Recipe:
    """The recipe of ``command`` for ``cfg.task``; a backend it does not run on is refused here."""
    recipe = RECIPES.get((command, cfg.task))
    if recipe is None:
        tasks = sorted(t for c, t in RECIPES if c == command)
        raise ConfigError(
            f"`unlearn {command}` runs with task={' or task='.join(tasks)}, not task={cfg.task}"
        )
    if cfg.backend.name not in recipe.backends:
        commands: dict[str, list[str]] = {}
        for (c, t), r in RECIPES.items():
            if cfg.backend.name in r.backends:
                commands.setdefault(t, []).append(c)
        runs = " and ".join(f"`unlearn {'|'.join(c)}` of task={t}" for t, c in commands.items())
        raise ConfigError(
            f"`unlearn {command}` of task={cfg.task} runs on backend.name={' or '.join(recipe.backends)}; "
            f"backend.name={cfg.backend.name} runs {runs or 'no command yet'}"
        )
    return recipe
