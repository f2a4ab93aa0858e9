"""The configs and DeepSpeed JSONs that ship inside the package (`unlearn configs` lists and copies them), found by
name wherever a path is asked for, so a pip user needs no checkout."""

from __future__ import annotations

from pathlib import Path

# The shipped configs and DeepSpeed JSONs, package data (a link to the checkout's configs/ in a source tree).
SHIPPED = Path(__file__).parents[1] / "configs"


def shipped_configs(kind: str = "") -> dict[str, Path]:
    """Name -> file of the shipped run configs (``kind=""``: configs/*.yaml) or DeepSpeed JSONs
    (``kind="deepspeed"``: configs/deepspeed/*.json)."""
    folder, pattern = (SHIPPED / kind, "*.json") if kind else (SHIPPED, "*.yaml")
    return {p.stem: p for p in sorted(folder.glob(pattern))}


def resolve_shipped(path: str | Path, kind: str = "") -> Path | None:
    """``path`` itself when it is a file; else the shipped file it names: by name (``demo``, ``zero3``), by file
    name (``demo.yaml``) or by its path in a checkout (``configs/demo.yaml``), so a pip user needs no checkout.
    None when it is neither."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = shipped_configs(kind)
    name = p.name.removesuffix(".json" if kind else ".yaml")
    in_checkout = p.parent == Path("configs", kind) or p.parent == Path()
    return shipped.get(name) if in_checkout else None
