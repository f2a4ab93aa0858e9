"""The layers, read from the source: nothing under backends/, methods/, data/, models/ or launchers/
imports a recipe or the CLI (a launcher runs the recipe the CLI hands it), and methods/ never import Ray
or DeepSpeed (pure tensor maths)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "engine"


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-local imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def offenders(folders: tuple[str, ...], banned: tuple[str, ...]) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted((ENGINE / folder).rglob("*.py")):
            for name in sorted(imported(path)):
                if any(name == b or name.startswith(b + ".") for b in banned):
                    found.append(f"{path.relative_to(ENGINE.parent)} imports {name}")
    return found


def test_the_reader_sees_what_it_checks():
    """The checker itself: it finds a function-local import (as the Ray worker's used to be)."""
    source = ENGINE / "launchers" / "ray_train.py"
    assert {"ray.train", "engine.data.store"} <= imported(source)
    assert offenders(("launchers",), ("engine.data",)) == [
        "engine/launchers/ray_train.py imports engine.data.store",
        "engine/launchers/ray_train.py imports engine.data.store.TokenStore",
        "engine/launchers/ray_train.py imports engine.data.store.encode_rows",
        "engine/launchers/ray_train.py imports engine.data.store.write_rows",
        "engine/launchers/ray_train.py imports engine.data.store.write_token_store",
    ]


@pytest.mark.parametrize("folder", ["backends", "methods", "data", "models", "tasks", "launchers"])
def test_lower_layers_import_no_recipe_and_no_cli(folder):
    assert offenders((folder,), ("engine.recipes", "engine.cli")) == []


def test_methods_are_pure_tensor_maths():
    assert offenders(("methods",), ("ray", "deepspeed", "engine.backends", "engine.launchers")) == []
