"""What every task shares about a forget set: its fingerprint.

``ids_sha256`` is the "sha256 of the sorted example ids" that receipts, model cards and
``unlearning.json`` carry for every task: the sha256 of the UTF-8 JSON array of the sorted ids, as
``json.dumps`` writes it (", " between items). Ids [3, 1, 2] -> sha256 of the 9 bytes ``[1, 2, 3]``.
Integer ids sort numerically and come before string ids, which sort as strings.
"""

from __future__ import annotations

import hashlib
import json


def ids_sha256(ids) -> str:
    ordered = sorted(ids, key=lambda v: (isinstance(v, str), v))
    return hashlib.sha256(json.dumps(ordered).encode()).hexdigest()
