"""Fault injection for tests and the fault benchmark: ``UNLEARN_FAULT=POINT:EPOCH[:rank=R][:once=FILE]``
makes the processes that reach ``POINT`` at the end of ``EPOCH`` (only rank ``R`` when given) die at
once with SIGKILL, as a preempted node does (no cleanup, no exception handlers). ``once=FILE``: only
the first time (the file records it), so a restarted run goes on. Unset, this does nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def inject(point: str, epoch: int, rank: int = 0) -> None:
    spec = os.environ.get("UNLEARN_FAULT")
    if not spec:
        return
    where, when, *options = spec.split(":")
    opts = dict(o.split("=", 1) for o in options)
    if where != point or int(when) != epoch or ("rank" in opts and int(opts["rank"]) != rank):
        return
    if "once" in opts:
        marker = Path(opts["once"])
        if marker.exists():
            return
        marker.write_text(f"killed rank {rank} after {point} of epoch {epoch}\n")
    os.kill(os.getpid(), signal.SIGKILL)
