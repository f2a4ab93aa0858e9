"""What every task shares about a forget set: the ids it is given and its fingerprint.

``requested_ids`` reads the ids a config names (inline and in ``ids_file``: a JSON list or one id per line).

``ids_sha256`` is the "sha256 of the sorted example ids" that receipts, model cards and
``unlearning.json`` carry for every task: the sha256 of the UTF-8 JSON array of the sorted ids, as
``json.dumps`` writes it (", " between items). Ids [3, 1, 2] -> sha256 of the 9 bytes ``[1, 2, 3]``.
Integer ids sort numerically and come before string ids, which sort as strings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.errors import DataError


def ids_sha256(ids) -> str:
    ordered = sorted(ids, key=lambda v: (isinstance(v, str), v))
    return hashlib.sha256(json.dumps(ordered).encode()).hexdigest()


def read_ids_file(path: str, key: str = "forget.ids_file") -> list:
    """The ids of a file: a JSON list, or one id per line (integers where they parse as such)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{key} {path!r} does not exist")
    text = p.read_text().strip()
    if text.startswith("["):
        return list(json.loads(text))
    return [int(t) if t.lstrip("-").isdigit() else t for t in text.split()]


def requested_ids(ids: list | None, ids_file: str | None, what: str) -> list:
    """The ids given inline plus those of the file, refused when listed twice (``what``: forget/retain)."""
    key = "forget.ids_file" if what == "forget" else f"forget.{what}_ids_file"
    requested = list(ids or []) + (read_ids_file(ids_file, key) if ids_file else [])
    seen, dups = set(), []
    for i in requested:
        (dups.append(i) if i in seen else seen.add(i))
    if dups:
        raise DataError(
            f"{len(dups)} {what} ids are listed more than once, e.g. {dups[:5]}; list each id once"
        )
    return requested
