"""Resumable checkpoints that can be trusted. Each checkpoint is a folder ``CHECKPOINTS/<tag>`` holding
what the backend writes (weights, optimizer state and the recipe's client state; DeepSpeed: every
rank's shards), each rank's RNG states, and, written LAST and atomically, ``manifest.json``:

    position (epoch, phase, step: where the loop goes on), data order (seed + stream sizes: the
    order of every epoch is a function of them, engine/backends/sampling.py), world size, ZeRO stage,
    the model's signature (parameter names and shapes), and the sha256 and size of every file.

A folder without a complete manifest is not a checkpoint (a save that was killed or ran out of disk);
it is ignored and the previous checkpoint, which is pruned only after the new manifest exists, is
used. Resuming verifies the newest checkpoint; a damaged file or a mismatch stops the run with an
error naming the file or field, unless ``checkpoint.on_invalid`` says to fall back to the previous good
checkpoint (``previous``) or to keep the weights and start a fresh optimizer (``weights``); what was
done is returned for the report.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from engine import faults
from engine.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_signature(model: torch.nn.Module) -> str:
    """sha256 of the parameter names and (whole, unpartitioned) shapes: another model, another signature."""
    rows = [f"{n}:{tuple(getattr(p, 'ds_shape', p.shape))}" for n, p in model.named_parameters()]
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and CUDA) as JSON: dropout draws after a
    resume are the ones the uninterrupted run would have made."""
    state = {
        "python": json.loads(json.dumps(random.getstate())),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    decode = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])


def _write_atomic(path: Path, text: str) -> None:
    """Write, flush to disk, rename, then flush the folder entry: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kind(rel: str) -> str:
    """What a checkpoint file holds: weights are needed by every resume mode, the rest only by a full one."""
    if rel.startswith("rng/") or rel == "client_state.json":
        return "state"
    return "optimizer" if "optim" in rel else "weights"


def has_checkpoint(folder: Path) -> bool:
    """Does ``folder`` hold anything that claims to be a checkpoint (a manifest, even a damaged one)?
    A save that died before its manifest is not one."""
    return any(Path(folder).glob(f"*/{MANIFEST}"))


def position_key(position: dict) -> tuple[int, int, int]:
    return (position["epoch"], position["phase_index"], position["step"])


def describe_position(position: dict) -> str:
    if position["phase_index"] == 0 and position["step"] == 0:
        return f"epoch {position['epoch'] - 1}"
    return f"epoch {position['epoch']}, {position['phase']} step {position['step']}"


class CheckpointStore:
    """The checkpoints of one run in ``folder``. Every process of the run creates one and calls
    ``save`` and ``load`` together (they are collective under DeepSpeed)."""

    def __init__(self, folder: Path, backend, identity: dict, keep: int = 2, log=print):
        self.folder = Path(folder)
        self.backend = backend
        self.identity = identity  # fields that must match to resume: world_size, zero_stage, model, ...
        self.keep = keep
        self.log = log

    # --- saving -----------------------------------------------------------------------------------

    def save(self, tag: str, position: dict, student, client_state: dict) -> None:
        b = self.backend
        target = self.folder / tag
        if b.is_main:
            if target.exists():
                shutil.rmtree(target)  # left by an earlier attempt that died before its manifest
            self.folder.mkdir(parents=True, exist_ok=True)
        b.barrier()
        try:
            b.save_checkpoint(self.folder, tag, student, client_state)
            (target / "rng").mkdir(parents=True, exist_ok=True)
            (target / "rng" / f"rank_{b.rank}.json").write_text(json.dumps(rng_state()))
            at_epoch_end = position["phase_index"] == 0 and position["step"] == 0
            faults.inject("during_save", position["epoch"] - at_epoch_end, b.rank)
            error = None
        except Exception as exc:  # OSError, or a writer's own wrapper of it (safetensors, DeepSpeed)
            error = f"rank {b.rank}: {type(exc).__name__}: {exc}"
        errors = [e for e in b.gather_object(error) if e]
        if errors:
            free = shutil.disk_usage(self.folder).free  # writers hide ENOSPC in their own errors (torch.save)
            space = f"; {free:,} bytes free there" + (": the disk is full" if free < 1 << 20 else "")
            if b.is_main:
                shutil.rmtree(target, ignore_errors=True)
            previous = self.complete()
            raise CheckpointError(
                f"could not write checkpoint {target} ({'; '.join(errors)}{space}); "
                + (f"the previous checkpoint {previous[-1][0]} is intact: " if previous else "")
                + "free space (or fix the folder) and run the same command again to resume"
            )
        b.barrier()
        files = sorted(p for p in target.rglob("*") if p.is_file())
        mine = {  # the files are hashed by all ranks, each a slice (a 70B checkpoint is ~1 TB)
            str(p.relative_to(target)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in files[b.rank :: b.world_size]
        }
        hashed = {k: v for part in b.gather_object(mine) for k, v in part.items()}
        if b.is_main:
            manifest = {
                "format": FORMAT,
                "tag": tag,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "position": position,
                **self.identity,
                "files": dict(sorted(hashed.items())),
            }
            try:
                _write_atomic(target / MANIFEST, json.dumps(manifest, indent=1) + "\n")
                _write_atomic(self.folder / "latest", tag)  # for DeepSpeed's tools; resuming reads manifests
            except OSError as exc:
                shutil.rmtree(target, ignore_errors=True)
                raise CheckpointError(
                    f"could not write {target / MANIFEST} ({exc}); the previous checkpoint is intact: free "
                    "space and run the same command again to resume"
                ) from exc
            for old, _ in self.complete()[: -max(self.keep, 2)]:
                shutil.rmtree(self.folder / old)
            for stray in self.folder.iterdir():  # folders of saves that died before their manifest
                if stray.is_dir() and not (stray / MANIFEST).exists():
                    shutil.rmtree(stray)
        b.barrier()

    # --- finding and verifying ----------------------------------------------------------------------

    def complete(self) -> list[tuple[str, dict | None]]:
        """(tag, manifest) of every folder that has a manifest file, oldest first by position; a
        manifest that cannot be read comes as None, ordered by its folder's time."""
        found = []
        if not self.folder.is_dir():
            return found
        for sub in self.folder.iterdir():
            path = sub / MANIFEST
            if not path.is_file():
                continue
            try:
                manifest = json.loads(path.read_text())
                key = position_key(manifest["position"])
            except (ValueError, KeyError, TypeError):
                manifest, key = None, (10**9, 0, int(path.stat().st_mtime))
            found.append((key, sub.name, manifest))
        return [(tag, m) for _, tag, m in sorted(found)]

    def problems(self, tag: str, manifest: dict | None) -> list[tuple[str, str]]:
        """(kind, message) of everything wrong with checkpoint ``tag``: kind is ``manifest``, ``model``,
        ``layout`` (world size / stage), or the kind of a damaged file (weights, optimizer, state)."""
        where = self.folder / tag
        if manifest is None:
            return [("manifest", f"{where / MANIFEST} is truncated or not valid JSON")]
        out = []
        if manifest.get("format") != FORMAT:
            out.append(
                ("manifest", f"{where / MANIFEST}: format {manifest.get('format')}, expected {FORMAT}")
            )
        for field, mine in self.identity.items():
            theirs = manifest.get(field)
            if theirs != mine:
                kind = "model" if field in ("backend", "model_signature", "data_order") else "layout"
                out.append(
                    (kind, f"{where / MANIFEST}: field {field!r} is {theirs!r}, this run has {mine!r}")
                )
        b = self.backend
        items = sorted(manifest.get("files", {}).items())
        mine_bad = []
        for rel, meta in items[b.rank :: b.world_size]:
            path = where / rel
            if not path.is_file():
                mine_bad.append((_kind(rel), f"{path} is missing"))
            elif path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
                mine_bad.append((_kind(rel), f"{path} does not match its sha256 in the manifest (damaged)"))
        out += [p for part in b.gather_object(mine_bad) for p in part]
        return out

    def check(self, tag: str) -> None:
        """Refuse checkpoint ``tag`` unless it is complete and every file matches its manifest (each rank hashes
        a slice, as when saving): what a run reads back besides resuming (SCRUB+R's chosen epoch)."""
        path = self.folder / tag / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            manifest = None
        problems = self.problems(tag, manifest)
        if problems:
            raise CheckpointError(
                f"checkpoint {tag} cannot be read back: " + "; ".join(m for _, m in problems)
            )

    def load(self, student, on_invalid: str = "error") -> dict | None:
        """Restore the newest usable checkpoint into ``student`` (and the backend's optimizer, and this
        process's RNG): returns ``{"tag", "position", "client_state", "mode", "skipped"}`` or None
        when there is no checkpoint. ``on_invalid``: error | previous | weights (see the module doc)."""
        candidates = self.backend.broadcast_object(self.complete())
        skipped = []
        for tag, manifest in reversed(candidates):
            problems = self.problems(tag, manifest)
            if not problems:
                client = self.backend.load_checkpoint(self.folder, tag, student, weights_only=False)
                rng = self.folder / tag / "rng" / f"rank_{self.backend.rank}.json"
                set_rng_state(json.loads(rng.read_text()))
                return {"tag": tag, "position": manifest["position"], "client_state": client,
                        "mode": "full", "skipped": skipped}  # fmt: skip
            message = "; ".join(m for _, m in problems)
            kinds = {k for k, _ in problems}
            # under ZeRO-3 the weights live in the optimizer's partitions: there are no weights without it
            zero3 = 3 in ((manifest or {}).get("zero_stage"), self.identity.get("zero_stage"))
            weights_ok = not kinds & {"manifest", "model", "weights"} and not zero3
            if on_invalid == "weights" and weights_ok:
                before = self.backend.fingerprint(student)
                client = self.backend.load_checkpoint(self.folder, tag, student, weights_only=True)
                if self.backend.fingerprint(student) == before:  # a loader that silently loaded nothing
                    raise CheckpointError(f"loading the weights of checkpoint {tag} left the model unchanged")
                self.log(f"checkpoint {tag}: {message}; continuing from its weights with a fresh optimizer")
                return {"tag": tag, "position": manifest["position"], "client_state": client,
                        "mode": "weights_only", "problems": message, "skipped": skipped}  # fmt: skip
            if on_invalid == "previous":
                self.log(f"checkpoint {tag} skipped: {message}; trying the previous one")
                skipped.append({"tag": tag, "problems": message})
                continue
            options = "checkpoint.on_invalid=previous resumes from the previous good checkpoint"
            if weights_ok and on_invalid != "weights":
                options += "; checkpoint.on_invalid=weights continues from its weights with a fresh optimizer"
            elif zero3:
                options += (
                    "; a ZeRO-3 checkpoint resumes only with its own world size and stage (its weights are "
                    "partitioned with the optimizer state; DeepSpeed's zero_to_fp32.py can consolidate them)"
                )
            raise CheckpointError(f"cannot resume from checkpoint {tag}: {message}. {options}")
        if skipped:
            raise CheckpointError(
                f"no usable checkpoint in {self.folder}: "
                + "; ".join(f"{s['tag']}: {s['problems']}" for s in skipped)
                + ". Delete the folder's parent (.partial) to start over"
            )
        return None
