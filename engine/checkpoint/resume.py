"""What every training recipe does with checkpoints, in one place: refuse another run's leftovers, restore
the newest usable checkpoint, write one after each epoch and one where a stop signal lands, say in the
report what was resumed, and remove them once the run's result is exported. The store underneath
(engine/checkpoint/store.py) decides what a trustworthy checkpoint is."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from engine.checkpoint.signals import StopRequest
from engine.checkpoint.store import CheckpointStore, describe_position, has_checkpoint, model_signature
from engine.errors import ConfigError, OutputError
from engine.loop import LoopHooks, LoopState, run_loop


def check_resumable(partial_dir: Path, cfg, checkpoints: tuple[str, ...] = ("checkpoints",),
                    finished: tuple[str, ...] = (), expected: bool = False) -> bool:  # fmt: skip
    """True when an unfinished run of the same config left something in ``partial_dir`` to go on from: a
    checkpoint in one of the ``checkpoints`` folders, or one of the ``finished`` files (a training run's
    completed target). A different config is refused rather than silently mixed. ``expected``: a launcher
    restarted the run after a failure (Ray Train), so finding nothing is an error, not a fresh start."""
    found = any(has_checkpoint(partial_dir / c) for c in checkpoints)
    if not found and not any((partial_dir / f).is_file() for f in finished):
        if expected:
            raise OutputError(
                f"restarted after a failure but {partial_dir / checkpoints[0]} has no complete checkpoint: refusing "
                "to start over silently (is the output folder on storage every worker sees?)"
            )
        return False
    saved = partial_dir / "config.yaml"
    mine = cfg.model_dump(mode="json")
    theirs = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    ignore = ("overwrite", "logging", "checkpoint")  # how to resume may change between attempts
    if theirs is None or {k: v for k, v in theirs.items() if k not in ignore} != {
        k: v for k, v in mine.items() if k not in ignore
    }:
        raise ConfigError(
            f"{partial_dir} holds an unfinished run with another config ({saved}); resume it with that config, "
            "or delete the folder to start over"
        )
    return True


class RunCheckpoints:
    """The checkpoints of one run in ``stage/name`` (a training run: one folder per target). ``client_state()``
    returns what the recipe needs back on resume (history, losses, ...); ``module`` is the bare model (for its
    signature)."""

    def __init__(
        self,
        stage: Path,
        cfg,
        backend,
        student,
        module,
        streams: dict,
        client_state: Callable[[], dict],
        log=print,
        name: str = "checkpoints",
        keep_all: bool = False,
    ):
        self.stage, self.folder = stage, stage / name
        self.cfg, self.backend, self.student = cfg, backend, student
        self.client_state, self.log = client_state, log
        identity = {  # what must match to resume
            "backend": backend.name,
            "world_size": backend.world_size,
            "zero_stage": backend.zero_stage,
            "model_signature": model_signature(module),
            "data_order": {"seed": cfg.seed, "streams": {k: len(v) for k, v in streams.items()}},
        }
        # keep_all: every epoch's checkpoint until the run ends (SCRUB+R chooses one of them)
        keep = 10**9 if backend.keep_checkpoints or keep_all else cfg.checkpoint.keep
        self.store = CheckpointStore(self.folder, backend, identity, keep=keep, log=log)
        self.restored: dict | None = None

    def restore(self) -> dict | None:
        """Load the newest usable checkpoint into the student (and optimizer, and RNG); its client state,
        or None when there is none."""
        self.restored = self.store.load(self.student, self.cfg.checkpoint.on_invalid)
        if self.restored is None:
            return None
        fresh = (
            " (its weights only, with a fresh optimizer)" if self.restored["mode"] == "weights_only" else ""
        )
        self.log(f"resuming from the checkpoint of {describe_position(self.start)} in "
                 f"{self.folder / self.restored['tag']}{fresh}")  # fmt: skip
        return self.restored["client_state"]

    @property
    def start(self) -> dict | None:
        """The loop position to go on from (run_loop's ``start``)."""
        return self.restored["position"] if self.restored else None

    def save(self, tag: str, position: dict) -> None:
        self.store.save(tag, position, self.student, self.client_state())

    def end_of_epoch(self, epoch: int) -> None:
        self.save(f"epoch_{epoch}", {"epoch": epoch + 1, "phase": None, "phase_index": 0, "step": 0,
                                     "epoch_losses": {}})  # fmt: skip

    def on_stop(self, position: dict) -> None:
        """run_loop's ``on_stop``: a checkpoint where the stop signal was seen."""
        self.save(f"epoch_{position['epoch']}-{position['phase']}-{position['step']}", position)
        self.log(f"stop signal: checkpoint written at {describe_position(position)}")

    def run(self, method, teacher, streams: dict, forward, *, epochs: int, on_step, on_epoch_end,
            stop_file: Path | None = None, teacher_outputs=None, end_phase=None) -> LoopState:  # fmt: skip
        """The one loop (engine/loop.py) for the student, from this run's position, with the checkpoint hooks:
        SIGTERM (or ``stop_file``) ends it with a checkpoint at the next step."""
        with StopRequest(stop_file) as stop:
            return run_loop(
                method, self.backend, self.student, teacher, streams, forward, seed=self.cfg.seed, epochs=epochs,
                start=self.start, max_abs_loss=self.cfg.checkpoint.max_abs_loss, progress=self.cfg.logging.progress,
                teacher_outputs=teacher_outputs,
                hooks=LoopHooks(on_step=on_step, on_epoch_end=on_epoch_end, should_stop=stop, on_stop=self.on_stop,
                                end_phase=end_phase),
            )  # fmt: skip

    def report(self) -> dict | None:
        """report.json's ``resume`` entry: None for a run that started from the beginning."""
        r = self.restored
        if r is None:
            return None
        return {"checkpoint": r["tag"], "position": describe_position(r["position"]), "mode": r["mode"],
                "problems": r.get("problems"), "skipped": r["skipped"]}  # fmt: skip

    def remove(self) -> None:
        """The run is complete (its model exported): checkpoints go, unless backend.keep_checkpoints."""
        if self.backend.is_main and not self.backend.keep_checkpoints and self.folder.exists():
            shutil.rmtree(self.folder)
            parent = (
                self.stage / "checkpoints"
            )  # a training run's checkpoints/<target>: the folder, once empty
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
