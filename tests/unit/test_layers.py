"""The layers, read from the source: every module of engine/ imports only from its own layer or lower ones, in the
order docs/layout.md writes down once (its "Layers" table, read here); methods/ are pure tensor maths (no Ray,
DeepSpeed or backend); no benchmark imports the tests."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "engine"


def layer_table(text: str) -> dict[str, int]:
    """Top-level name under engine/ (folder or module) -> its layer number, from the table under "## Layers":
    rows ``| N name | `a` `b` ... |``."""
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for number, names in re.findall(r"^\|\s*(\d+)[^|]*\|([^|]*)\|", section, flags=re.M):
        for name in re.findall(r"`([\w.]+)`", names):
            layers[name.removesuffix(".py")] = int(number)
    return layers


LAYERS = layer_table((ROOT / "docs" / "layout.md").read_text())


def imports(source: str, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import of ``source`` (the module ``module``, dotted), at any depth:
    function-local imports and those under TYPE_CHECKING count too. ``from engine import x`` names engine.x
    when x is a module (``__version__`` is the package's own)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                package = module.split(".")[: -node.level]
                base = ".".join(package + ([base] if base else []))
            found += [(node.lineno, f"{base}.{a.name}" if base == "engine" and _is_module(a.name) else base)
                      for a in node.names]  # fmt: skip
    return found


def _is_module(name: str) -> bool:
    return (ENGINE / name).is_dir() or (ENGINE / f"{name}.py").is_file()


def layer_of(dotted: str) -> str | None:
    """``engine.eval.report`` -> ``eval``; None outside engine (or the package root itself)."""
    parts = dotted.split(".")
    return parts[1] if parts[0] == "engine" and len(parts) > 1 else None


def upward_imports(path: Path, source: str | None = None) -> list[str]:
    relative = path.relative_to(ROOT)
    module = ".".join(relative.with_suffix("").parts)
    own = layer_of(module)
    out = []
    for line, name in imports(source if source is not None else path.read_text(), module):
        target = layer_of(name)
        if target is None or own is None or target == own:
            continue
        if LAYERS[target] > LAYERS[own]:
            out.append(
                f"{relative}:{line} (layer {LAYERS[own]}, {own}) imports {name} (layer {LAYERS[target]}, {target})"
            )
    return out


MODULES = sorted(p for p in ENGINE.rglob("*.py") if p.parent != ENGINE or p.name != "__init__.py")


def test_every_folder_and_module_has_a_layer():
    names = {p.relative_to(ENGINE).parts[0].removesuffix(".py") for p in MODULES}
    assert sorted(names - set(LAYERS)) == [], "add them to the Layers table of docs/layout.md"
    assert sorted(set(LAYERS) - names) == [], "the Layers table names what engine/ no longer has"


def test_no_module_imports_from_a_layer_above_its_own():
    assert [line for p in MODULES for line in upward_imports(p)] == []


def test_the_checker_finds_a_planted_upward_import():
    """The checker itself, on a planted source: a function-local import of a higher layer, and a `from engine
    import x` of one, are both found and named; an import of the same or a lower layer is not."""
    path = ENGINE / "checkpoint" / "store.py"
    source = (
        "from engine import io\nfrom engine.loop import run_loop\n\n"
        "def f():\n    from engine.eval.report import write_report\n    from engine import cli\n"
    )
    assert upward_imports(path, source) == [
        f"engine/checkpoint/store.py:5 (layer {LAYERS['checkpoint']}, checkpoint) imports engine.eval.report "
        f"(layer {LAYERS['eval']}, eval)",
        f"engine/checkpoint/store.py:6 (layer {LAYERS['checkpoint']}, checkpoint) imports engine.cli "
        f"(layer {LAYERS['cli']}, cli)",
    ]


def _imported(folder: Path) -> list[tuple[Path, int, str]]:
    return [
        (p, line, name)
        for p in sorted(folder.rglob("*.py"))
        for line, name in imports(p.read_text(), ".".join(p.relative_to(ROOT).with_suffix("").parts))
    ]


def test_methods_are_pure_tensor_maths():
    banned = ("ray", "deepspeed", "engine.backends", "engine.launch", "engine.tasks", "engine.recipes")
    found = [
        f"{p.relative_to(ROOT)}:{line} imports {name}"
        for p, line, name in _imported(ENGINE / "methods")
        if any(name == b or name.startswith(b + ".") for b in banned)
    ]
    assert found == []


@pytest.mark.parametrize("folder", ["engine", "benchmarks"])
def test_no_tests_imported_outside_the_tests(folder):
    found = [
        f"{p.relative_to(ROOT)}:{line} imports {name}"
        for p, line, name in _imported(ROOT / folder)
        if name == "tests" or name.startswith("tests.")
    ]
    assert found == []
