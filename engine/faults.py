"""Fault injection for tests and the fault benchmark: ``UNLEARN_FAULT=POINT:EPOCH`` makes every process
that reaches ``POINT`` at the end of ``EPOCH`` die at once with SIGKILL, as a preempted node does (no
cleanup, no exception handlers). Unset, this does nothing."""

from __future__ import annotations

import os
import signal


def inject(point: str, epoch: int) -> None:
    if os.environ.get("UNLEARN_FAULT") == f"{point}:{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)
