"""The run session every command shares, around its own work: the config's refusals for the command and the
output folder checked before any work, resume found (or another run's leftovers refused), the seed, the backend
and the main rank's log; then the staged folder the results are written into and renamed into place when
complete, the resolved config in it, the tracker, the resumable checkpoints, the report; and at the end the
backend closed and the model pushed. Each recipe (train.py, unlearn.py, evaluate.py, audit.py, request.py) is its
own stages over one session, as torchtune's recipes are over their interface (setup, train, save, cleanup).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from engine import provenance
from engine.artifacts.export import check_output_dir, staged_dir
from engine.artifacts.hub import push_run
from engine.artifacts.run_folder import RunFolder
from engine.backends import Backend, build_backend
from engine.checkpoint.resume import RunCheckpoints, check_resumable
from engine.config import RunConfig, check, dump_config
from engine.eval.report import write_report
from engine.tracking import Tracker


class Session:
    """One command's run of ``cfg``. ``command``: train, run, eval or audit (what the config's rules check for).
    ``checkpoints`` / ``finished``: where an unfinished run of this config left something to resume from (folders
    of checkpoints, files of finished parts), None for a command that never resumes; ``expect_resume``: a launcher
    restarted it after a failure, so a checkpoint must be there. ``backend``: a launcher's (Ray Train's), else one
    is built from ``cfg.backend``; ``with_backend=False`` for a command that trains in other processes (audit)."""

    def __init__(
        self,
        cfg: RunConfig,
        command: str,
        log: Callable[..., None] = print,
        backend: Backend | None = None,
        *,
        targets: tuple[str, ...] | None = None,
        checkpoints: tuple[str, ...] | None = None,
        finished: tuple[str, ...] = (),
        expect_resume: bool = False,
        with_backend: bool = True,
    ):
        check(cfg, command, targets)  # the config's refusals (engine/config/rules.py), before any work
        self.cfg, self.command = cfg, command
        self.out = check_output_dir(cfg.output_dir, cfg.overwrite)
        self.folder = RunFolder(self.out)
        provenance.reset()  # the receipt names what this run reads, from here on
        self.resume = bool(checkpoints) and check_resumable(
            self.folder.partial, cfg, checkpoints, finished=finished, expected=expect_resume
        )
        seed_everything(cfg.seed)
        self.backend = backend or (build_backend(cfg.backend) if with_backend else None)
        main = self.backend is None or self.backend.is_main
        self.is_main = main
        self.log = log if main else _quiet  # one log per run, not one per rank

    @contextmanager
    def stage(self, scratch: Path | None = None) -> Iterator[Path]:
        """The staging folder ``OUTPUT.partial``, renamed to ``OUTPUT`` when the block completes (left behind for
        inspection and resume when it fails), with the resolved config in it. ``scratch`` (the run's token stores,
        ``OUTPUT.tokens``) is removed when the block ends, however it ends: tokenized forget rows are never left
        behind."""
        try:
            with staged_dir(
                self.cfg.output_dir, self.cfg.overwrite, self.backend, resume=self.resume
            ) as stage:
                if self.is_main:
                    dump_config(self.cfg, stage / "config.yaml")
                yield stage
        finally:
            if scratch is not None and self.is_main:
                shutil.rmtree(scratch, ignore_errors=True)

    def tracker(self, stage: Path, suffix: str = "") -> Tracker:
        """W&B when logging.wandb (the main rank only), named after the output folder (+ ``suffix``)."""
        logging = self.cfg.logging if self.is_main else self.cfg.logging.model_copy(update={"wandb": False})
        return Tracker(logging, stage, name=self.out.name + suffix, config=self.cfg.model_dump(mode="json"))

    def checkpoints(self, stage: Path, student, module, streams: dict, client_state: Callable[[], dict],
                    name: str = "checkpoints", keep_all: bool = False) -> RunCheckpoints:  # fmt: skip
        """The resumable checkpoints of the student in ``stage/name`` (engine/checkpoint/resume.py)."""
        return RunCheckpoints(stage, self.cfg, self.backend, student, module, streams, client_state,
                              log=self.log, name=name, keep_all=keep_all)  # fmt: skip

    def report(self, folder: Path, report: dict) -> None:
        """report.json, report.md and plots (engine/eval/report.py), written by the main rank, with where it ran."""
        if self.is_main:
            write_report(
                folder, {**report, "backend": backend_summary(self.backend)} if self.backend else report
            )

    def close(self) -> Path:
        """Leave the process group; then, once the run folder is in place, push it (a failed upload loses
        nothing)."""
        if self.backend is not None:
            self.backend.close()
        push = self.cfg.output.push_to_hub if self.command == "run" else None
        if push and self.is_main:
            push_run(self.out, push, self.cfg.output.private, self.log)
        return self.out


def _quiet(*args, **kwargs) -> None:
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_frozen(
    backend: Backend, task, path: str, revision: str | None = None, trust_remote_code: bool = False
):
    """A model to score, not train: loaded by the task (partitioned while it loads under ZeRO-3), frozen by the
    backend, the Hugging Face module returned."""
    with backend.init_context():
        model = task.load(path, revision, trust_remote_code)
    return backend.unwrap(backend.prepare_frozen(model))


def backend_summary(backend: Backend) -> dict:
    """Where a run ran, for its report."""
    return {"name": backend.name, "world_size": backend.world_size, "zero_stage": backend.zero_stage,
            "accumulation": backend.accum}  # fmt: skip


def log_memory(log, memory: list[dict]) -> None:
    for row in memory:
        log("memory rank {rank}: peak {peak_bytes:,} B ({peak_kind}); parameters {parameter_bytes:,} B, "
            "gradients {gradient_bytes:,} B, optimizer state {optimizer_bytes:,} B".format(**row))  # fmt: skip


def training_seconds(model_dir: str | None) -> float | None:
    """How long `unlearn train` took to train the model in ``model_dir`` (its report.json's ``train_seconds``):
    the verdict's "time against retraining". None when the folder has no such report (a hub id, a model trained
    elsewhere)."""
    report = Path(model_dir) / "report.json" if model_dir else None
    if report is None or not report.is_file():
        return None
    try:
        value = json.loads(report.read_text()).get("train_seconds")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, int | float) else None
