"""Rows from wherever `datasets` can read them: a local folder of split files (parquet, json/jsonl, csv,
arrow) or one file, a ``datasets.save_to_disk`` folder, or a hub id. Local files are read without leaving
an Arrow copy in the datasets cache (forget-data hygiene)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from engine import provenance
from engine.errors import DataError, first_line

MIRROR = "UNLEARN_DATA_MIRROR"


def resolve(source: str, what: str = "data.dataset") -> str:
    """Where to read ``source`` from: itself when it is a local path; else, for a hub id, a local copy in the
    folder the ``UNLEARN_DATA_MIRROR`` variable names, laid out as ``MIRROR/<name>`` (the id's last part,
    lower-cased: ``uoft-cs/cifar10`` -> ``MIRROR/cifar10``, ``locuslab/TOFU`` -> ``MIRROR/tofu``) or
    ``MIRROR/<owner>/<name>``; else the hub id itself, unless ``HF_HUB_OFFLINE`` forbids the hub. A local path
    or a mirrored copy is recorded for the receipt here (a hub id when it is read: ``hub_revision``)."""
    if Path(source).exists():
        provenance.record_dataset(source)
        return source
    mirror = os.environ.get(MIRROR)
    if mirror:
        for copy in (Path(mirror) / source, Path(mirror) / source.split("/")[-1].lower()):
            if copy.exists():
                provenance.record_dataset(source, mirror=str(copy))
                return str(copy)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline or not provenance.hub_reachable():
        why = "HF_HUB_OFFLINE forbids the hub" if offline else "the hub cannot be reached from this machine"
        raise DataError(
            f"{what} {source!r} is not a local path, {why}, and {MIRROR} holds no copy of it: set {MIRROR} to a "
            f"folder holding a copy ({MIRROR}/{source.split('/')[-1].lower()}), or point {what} at one"
        )
    return source


def hub_revision(source: str) -> str | None:
    """The commit of the hub dataset ``source`` to read (recorded for the receipt): the datasets are then loaded
    at it, so the receipt names what was read. None when it cannot be resolved (no hub, nothing in the hub cache):
    the load then goes ahead as ``datasets`` does it (its own cache, its own error), recorded without a revision."""
    known = provenance.dataset_revision(source)
    if known is not None:
        return known  # one commit for every split of a run (TOFU reads seven)
    try:
        sha = provenance.resolve_hub_revision(source, None, "dataset")
    except Exception:  # fail open: `datasets` may still read its own cache, or says why it cannot
        sha = None
    provenance.record_dataset(source, revision=sha)
    return sha


_DATA_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def load_splits(dataset: str, splits: list[str]):
    """Return ``{split: datasets.Dataset}`` from a local folder/file or a hub id."""
    import datasets

    source, dataset = dataset, resolve(dataset)
    path = Path(dataset)
    if path.exists():
        if path.is_dir() and (path / "dataset_dict.json").exists():
            dd = datasets.load_from_disk(str(path))
            return {s: dd[s] for s in splits if s in dd}
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _DATA_SUFFIXES)
        if not files:
            raise DataError(
                f"no parquet/json/csv files in {dataset!r}; expected e.g. train-00000-of-00001.parquet"
            )
        builder = _DATA_SUFFIXES[files[0].suffix]
        data_files = {s: [str(f) for f in files if f.name.split("-")[0].split(".")[0] == s] for s in splits}
        data_files = {s: f for s, f in data_files.items() if f}
        if not data_files:
            raise DataError(
                f"{dataset!r} has no files named after the splits {splits} (e.g. 'train-*.parquet')"
            )
        return _load_in_memory(builder, data_files)
    try:
        dd = datasets.load_dataset(dataset, revision=hub_revision(dataset))
    except Exception as exc:  # the hub raises many kinds; all mean "can't get it"
        raise DataError(
            f"cannot load dataset {source!r}: not a local path, no copy in {MIRROR}, and the hub said: "
            f"{first_line(exc)}. Offline, set {MIRROR} to a folder "
            f"holding a copy ({MIRROR}/{source.split('/')[-1].lower()})"
        ) from exc
    return {s: dd[s] for s in splits if s in dd}


def _load_in_memory(builder: str, data_files: dict) -> dict:
    """Local files through ``datasets`` without leaving a cache behind: ``load_dataset`` always writes
    an Arrow copy of the data (images of forgotten examples included) to its cache, so it writes to a
    throwaway folder, the tables are read into memory, and the folder is deleted (forget-data hygiene).
    The cost: the data is converted on every load and held in memory (as compressed image bytes)."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="engine-datasets-") as cache:
        return dict(
            datasets.load_dataset(builder, data_files=data_files, cache_dir=cache, keep_in_memory=True)
        )


def load_rows(source: str, split: str = "train", what: str = "data.dataset") -> list[dict]:
    """The rows of one split as dicts: ``source`` may also be a single data file (it is then the split)."""
    path = Path(resolve(source, what))
    if path.is_file():
        builder = _DATA_SUFFIXES.get(path.suffix)
        if builder is None:
            raise DataError(
                f"{what} {source!r}: read .jsonl, .json, .parquet, .csv or .arrow files, not {path.suffix!r}"
            )
        return _load_in_memory(builder, {split: [str(path)]})[split].to_list()
    splits = load_splits(source, [split])
    if split not in splits:
        raise DataError(f"{what} {source!r} has no split {split!r} (it has {sorted(splits)})")
    return splits[split].to_list()
