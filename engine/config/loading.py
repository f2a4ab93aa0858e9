"""Reading a run config: a YAML file (or a shipped config's name) + ``key=value`` overrides, validated by pydantic
(engine/config/schema.py), each mistake in one line with a suggestion; ``dump_config`` writes the resolved config
next to every result so a run can be repeated exactly."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from engine.config.schema import RunConfig
from engine.config.shipped import resolve_shipped, shipped_configs
from engine.errors import ConfigError, first_line
from engine.methods import METHODS


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """``["method.alpha=0.5", "forget.ids=[1,2]"]`` -> ``[(["method", "alpha"], 0.5), ...]``; values are parsed
    as YAML. A method switch (``method=NAME``, or a mapping for ``method``) comes first, wherever it was written:
    ``method.lr=1e-4 method=npo`` would otherwise set SCRUB's lr and then drop it with SCRUB's section."""
    items, switches = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example: method.alpha=0.5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or "" in key.split("."):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or first_line(err)
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({problem}); quote it for the shell, e.g. "
                "'forget.ids=[3,17]'"
            ) from None
        if key == "method" and isinstance(value, str):
            value = {"name": value}  # `method=npo`: that method's defaults, not the file's SCRUB keys
        (switches if key == "method" else items).append((key.split("."), value))
    if len(switches) > 1:
        raise ConfigError("method= is given more than once in the overrides: pass one method=NAME")
    return switches + items


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``data`` (a loaded YAML tree, not changed) with each override applied in turn. An override sets the value
    its key names, whole: a mapping replaces a mapping (``forget.where={source: X}`` forgets the rows of source X,
    whatever columns the file's filter named), a list replaces a list; the sections on the way are kept, and an
    empty one (``model.lora: null``) is started (``model.lora.rank=8``)."""
    out = copy.deepcopy(data)
    for keys, value in parse_overrides(overrides):
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {'.'.join(keys)!r}: {'.'.join(keys[: i + 1])} is a value, not a section"
                )
            node = child
        node[keys[-1]] = copy.deepcopy(value)
    return out


def _known_keys(model_cls, loc: tuple) -> list[str]:
    """Field names available at ``loc`` (for 'did you mean' hints)."""
    cls = model_cls
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")]
        if not candidates:
            return []
        cls = candidates[0]
    return list(cls.model_fields) if hasattr(cls, "model_fields") else []


METHOD_TAGS = tuple(METHODS)  # pydantic's union tags in error locations


def _format_errors(err: ValidationError, source: str) -> str:
    lines: list[str] = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if isinstance(p, str) and p not in METHOD_TAGS)
        where = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            tag = next((p for p in e["loc"] if p in METHOD_TAGS), None)
            # the keys of the method the error is about (not the first member of the union)
            keys = (
                list(METHODS[tag][0].model_fields) if tag and len(loc) == 2 else _known_keys(RunConfig, loc)
            )
            hint = difflib.get_close_matches(loc[-1], keys, n=1)
            msg = (
                f"unknown key {where!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; known keys here: {', '.join(keys)}"
                + (
                    f"; method={tag} has no {loc[-1]!r}: to switch methods pass method=NAME, which starts from "
                    "that method's defaults (other methods' keys do not carry over)"
                    if tag
                    else ""
                )
            )
        elif e["type"] == "value_error" and not loc:  # a rule over several sections: its message says it all
            msg = e["msg"].removeprefix("Value error, ")
        elif e["type"] == "value_error":  # a rule of the section: its message names the values
            msg = f"{where}: {e['msg'].removeprefix('Value error, ')}"
        else:
            msg = f"{where}: {e['msg']} (got {e.get('input')!r})"
        lines.append(msg)
    # one line, whatever the number of mistakes: the CLI prints `error: ...` and nothing else
    return f"invalid config ({source}): " + "; ".join(lines)


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, command: str | None = None
) -> RunConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides; ``command``
    (train, run, eval, audit) replaces ``{command}`` in ``output_dir``."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = resolve_shipped(path)
        if p is None:
            raise ConfigError(
                f"config file {str(path)!r} does not exist; give a path or a shipped config's name "
                f"({', '.join(shipped_configs())}; `unlearn configs` lists them)"
            )
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or first_line(err)
            raise ConfigError(
                f"{p}:{where}: not valid YAML ({problem}); fix the file and run again"
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {str(p)!r} cannot be read: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        data, source = loaded, str(p)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides " + " ".join(overrides)
    # A method section that omits `name` means SCRUB; the discriminator needs it spelled out.
    if isinstance(data.get("method"), dict):
        data["method"].setdefault("name", "scrub")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    if command == "train" and cfg.model.base is not None:  # train fine-tunes the base; run/eval read path
        cfg.model.path = cfg.model.base
        cfg.model._path_key = "model.base"
    if command is not None:  # one config, a folder per command (configs/text.yaml)
        cfg.output_dir = cfg.output_dir.replace("{command}", command)
    return cfg


def dump_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
