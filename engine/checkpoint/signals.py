"""Preemption with notice. SIGTERM (Slurm's `scancel` and time limit, Kubernetes, torchrun and the
`deepspeed` launcher passing on their own SIGTERM) or SIGUSR1 (`sbatch --signal=USR1@120`) only sets a
flag here; the loop reads it after every step, all ranks agree on it in that step's all-reduce, and the
recipe writes a checkpoint at that step boundary before exiting with status 75 (engine/errors.py)."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """``with StopRequest() as stop:`` ... ``stop()`` is True once a stop signal has arrived."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __call__(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
