"""Tokenized rows on disk, read by index: the rows a process trains on reach it without a pass over the
rest, and no process holds the whole tokenized set in memory.

A store is a folder: ``input_ids.i32`` and ``labels.i32`` (every row's tokens, one after another, int32),
``index.npy`` (per row: start and length in those buffers) and ``meta.json`` (written last: a folder
without it is not a store). Readers memory-map the buffers, so ``get(rows)`` touches only the pages of
those rows. Why numpy memory maps and not an Arrow dataset: a row is two slices of two flat buffers, and
the store needs no cache folder, fingerprint or lock (nothing of the forget set is left behind elsewhere).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from engine.data.text import collate, join_text

META = "meta.json"


def write_token_store(folder: str | Path, size: int, batches: Iterable[dict]) -> Path:
    """Write ``size`` tokenized rows from ``batches`` (dicts with ``row``, ``input_ids``, ``labels``: a
    row number in ``[0, size)`` and its two token lists; rows in any order, each exactly once) into
    ``folder``, atomically: built under ``folder.tmp`` and moved into place complete."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = np.lib.format.open_memmap(tmp / "index.npy", mode="w+", dtype=np.int64, shape=(size, 2))
    index[:] = -1
    offset = 0
    with open(tmp / "input_ids.i32", "wb") as ids_file, open(tmp / "labels.i32", "wb") as labels_file:
        for batch in batches:
            for row, ids, labels in zip(batch["row"], batch["input_ids"], batch["labels"]):
                row, n = int(row), len(ids)
                if not 0 <= row < size or index[row, 0] != -1 or len(labels) != n:
                    raise ValueError(f"token store: row {row} is out of range, repeated or malformed")
                ids_file.write(np.asarray(ids, dtype=np.int32).tobytes())
                labels_file.write(np.asarray(labels, dtype=np.int32).tobytes())
                index[row] = (offset, n)
                offset += n
    missing = int((index[:, 0] == -1).sum())
    if missing:
        raise ValueError(f"token store: {missing} of {size} rows were never written")
    index.flush()
    del index
    (tmp / META).write_text(json.dumps({"rows": size, "tokens": offset}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def write_rows(folder: str | Path, rows: list[dict], encode_row, chunk_rows: int = 4096) -> Path:
    """A store of ``rows`` encoded by ``encode_row`` (a formatter's: ``{"input_ids", "labels"}``),
    ``chunk_rows`` rows at a time, so the whole set's tokens are never in memory at once."""

    batches = (
        encode_rows(
            encode_row, range(start, min(start + chunk_rows, len(rows))), rows[start : start + chunk_rows]
        )
        for start in range(0, len(rows), chunk_rows)
    )
    return write_token_store(folder, len(rows), batches)


def encode_rows(encode_row, numbers, rows: list[dict]) -> dict:
    """A batch for ``write_token_store``: row numbers and the tokens of their rows, each encoded by
    ``encode_row`` as ``TextStream`` encodes it (here, or in a Ray Data task: engine/launch/ray_train.py)."""
    out = [encode_row(r) for r in rows]
    return {"row": numbers, "input_ids": [o["input_ids"] for o in out], "labels": [o["labels"] for o in out]}


class TokenStore:
    """A stream over a store (the loop's stream protocol: ``len`` and ``get(rows, seed)``): each call
    reads exactly the rows asked for and pads them into a batch (``engine.data.text.collate``)."""

    def __init__(self, folder: str | Path, pad_id: int):
        folder = Path(folder)
        if not (folder / META).is_file():
            raise FileNotFoundError(f"{folder} is not a complete token store (no {META})")
        meta = json.loads((folder / META).read_text())
        self.size, self.pad_id = int(meta["rows"]), pad_id
        self.index = np.load(folder / "index.npy", mmap_mode="r")
        tokens = int(meta["tokens"])
        # np.memmap cannot map an empty file: a store of empty rows reads nothing
        self.ids, self.labels = (
            np.memmap(folder / name, dtype=np.int32, mode="r", shape=(tokens,))
            if tokens
            else np.zeros(0, np.int32)
            for name in ("input_ids.i32", "labels.i32")
        )

    def __len__(self) -> int:
        return self.size

    def example(self, i: int) -> dict:
        start, n = (int(v) for v in self.index[i])
        return {
            "input_ids": self.ids[start : start + n].tolist(),
            "labels": self.labels[start : start + n].tolist(),
        }

    def get(self, rows: torch.Tensor, seed: int = 0) -> dict:
        batch = collate([self.example(int(r)) for r in rows], self.pad_id)
        batch["rows"] = rows
        return batch

    def join(self, rows: torch.Tensor, other, other_rows: torch.Tensor, seed: int = 0) -> dict:
        """As ``TextStream.join`` (engine/data/paired.py)."""
        return join_text(self, rows, other, other_rows)
