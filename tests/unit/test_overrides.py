"""A ``key=value`` override sets the value its key names, whole: a mapping replaces the file's mapping instead of
being merged into it (a merged ``forget.where`` silently forgot fewer rows than asked), for every mapping-valued
field of the config; and a method switch written after ``method.*`` overrides no longer drops them."""

from __future__ import annotations

import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from engine.config import RunConfig, load_config
from engine.errors import ConfigError


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


TEXT = {"task": "causal_lm", "data": {"dataset": "corpus.jsonl", "text_column": "text"}}


def test_a_where_filter_given_on_the_command_line_replaces_the_files(tmp_path):
    path = write(tmp_path, {**TEXT, "forget": {"kind": "where", "where": {"author": "author_1"}}})
    assert load_config(path).forget.where == {"author": "author_1"}
    cfg = load_config(path, ["forget.where={source: X}"])
    assert cfg.forget.where == {"source": "X"}  # not {'author': 'author_1', 'source': 'X'}
    # a dotted key still changes one column of the file's filter
    assert load_config(path, ["forget.where.source=X"]).forget.where == {"author": "author_1", "source": "X"}


def _sections(cls: type[BaseModel], prefix: str = "") -> typing.Iterator[tuple[str, type | None]]:
    """Every mapping-valued field of the config: (dotted key, its section class; None for a plain dict field)."""
    for name, field in cls.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = field.annotation
        args = (
            typing.get_args(annotation)
            if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
            else (annotation,)
        )
        if dotted == "method":  # the discriminated union of methods: tested by the switch below
            continue
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield dotted, arg
                yield from _sections(arg, dotted + ".")
            elif arg is dict or typing.get_origin(arg) is dict:
                yield dotted, None


SECTIONS = list(_sections(RunConfig))


def test_the_walk_finds_the_mapping_fields():
    keys = [k for k, _ in SECTIONS]
    assert {"forget.where", "model", "model.lora", "data", "backend", "eval", "ledger"} <= set(keys)


def _changed_field(cls: type[BaseModel]) -> tuple[str, object] | None:
    """A field of ``cls`` and a valid value other than its default (for a section, to see it reset)."""
    for name, field in cls.model_fields.items():
        default = field.get_default(call_default_factory=True)
        literals = [
            a
            for a in typing.get_args(field.annotation)
            if typing.get_origin(field.annotation) is typing.Literal
        ]
        candidates = [*literals, True, False, 7, 0.5, "changed"]
        if isinstance(default, bool):
            candidates = [not default]
        elif isinstance(default, int | float):
            candidates = [default + 1, *candidates]
        for value in candidates:
            if value == default:
                continue
            try:
                if getattr(cls(**{name: value}), name) == value:
                    return name, value
            except ValidationError:
                continue
    return None


@pytest.mark.parametrize("dotted,section", SECTIONS, ids=[k for k, _ in SECTIONS])
def test_every_mapping_override_replaces_the_files_mapping(tmp_path, dotted, section):
    keys = dotted.split(".")
    if section is None:  # a plain mapping (forget.where): the file's keys go
        base, override, expect = {"a": 1}, "{b: 2}", {"b": 2}
        data = {"forget": {"kind": "where"}} | TEXT if dotted == "forget.where" else {}
    else:
        change = _changed_field(section)
        assert change is not None, f"{dotted}: no field to change"
        name, value = change
        base, override, expect = {name: value}, "{}", section().model_dump(mode="json")
        data = {}
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = base
    path = write(tmp_path, data)
    cfg = load_config(path, [f"{dotted}={override}"])
    got = cfg
    for key in keys:
        got = getattr(got, key)
    got = got.model_dump(mode="json") if isinstance(got, BaseModel) else got
    assert got == expect, f"{dotted}: the file's {base} survived the override {override}"


def test_a_method_switch_after_method_keys_keeps_them(tmp_path):
    path = write(tmp_path, {"method": {"name": "scrub", "msteps": 1, "lr": 0.01}})
    cfg = load_config(path, ["method.lr=0.002", "method=npo"])
    assert cfg.method.name == "npo" and cfg.method.lr == 0.002
    # the file's SCRUB keys are dropped with its section, as before
    assert load_config(path, ["method=npo"]).method.lr != 0.01
    # a SCRUB-only key before the switch is no longer dropped silently: it is refused for the new method
    with pytest.raises(ConfigError, match="msteps"):
        load_config(path, ["method.msteps=2", "method=npo"])


def test_two_method_switches_are_refused():
    with pytest.raises(ConfigError, match="more than once"):
        load_config(None, ["method=npo", "method=grad_diff"])


def test_a_key_under_an_unset_section_starts_it(tmp_path):
    path = write(tmp_path, {"model": {"path": "x", "lora": None}})
    cfg = load_config(path, ["model.lora.rank=8"])
    assert cfg.model.lora is not None and cfg.model.lora.rank == 8 and cfg.model.path == "x"


def test_overrides_leave_the_loaded_file_untouched(tmp_path):
    path = write(tmp_path, {"forget": {"kind": "ids", "ids": [1, 2]}})
    assert load_config(path, ["forget.ids=[3]"]).forget.ids == [3]
    assert load_config(path).forget.ids == [1, 2]
