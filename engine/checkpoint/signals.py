"""Preemption with notice. SIGTERM (Slurm's `scancel` and time limit, Kubernetes, torchrun and the
`deepspeed` launcher passing on their own SIGTERM) or SIGUSR1 (`sbatch --signal=USR1@120`) only sets a
flag here; the loop reads it after every step, all ranks agree on it in that step's all-reduce, and the
recipe writes a checkpoint at that step boundary before exiting with status 75 (engine/errors.py).

Ray Train runs the loop in worker threads, where no handler can be set, and `ray job stop` signals the
driver only: the driver's handler writes a stop file (``write=True``) that the workers' ``StopRequest``
of the same file reads after every step (one stat)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path


class StopRequest:
    """``with StopRequest() as stop:`` ... ``stop()`` is True once a stop signal has arrived (or, with
    ``stop_file``, once that file exists; ``write=True``: a signal creates it)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, stop_file: Path | None = None, write: bool = False):
        self.received: int | None = None
        self.stop_file, self.write = stop_file, write
        self._old: dict = {}

    def __call__(self) -> bool:
        return self.received is not None or (self.stop_file is not None and self.stop_file.exists())

    def _handle(self, signum, frame) -> None:
        self.received = signum
        if self.write and self.stop_file is not None:
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)
            self.stop_file.write_text(f"stop requested by signal {signal.Signals(signum).name}\n")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
