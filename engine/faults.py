"""Fault injection for tests and the fault benchmark (benchmarks/faults.py). Unset, this does nothing.

``UNLEARN_FAULT=POINT:EPOCH[:step=S][:rank=R][:do=ACTION][:once=FILE]``: the processes that reach
``POINT`` in ``EPOCH`` (at step ``S`` of a phase when given; only rank ``R`` when given) do ACTION:

- ``kill`` (default): die at once with SIGKILL, as a preempted node does (no cleanup, no handlers);
- ``term``: send themselves SIGTERM (preemption with notice: the engine checkpoints and exits);
- ``hang``: stop responding (sleep), as a rank stuck in I/O or a driver call does;
- ``nan``: the caller's loss becomes NaN (``inject`` returns True).

Points: ``step`` (after a step's backward, before its loss is shared), ``during_save`` (a checkpoint's
files are written, its manifest not yet), ``after_checkpoint`` (an epoch's checkpoint is complete);
`unlearn request process`, with the version number as EPOCH: ``request_after_job`` (the job folder is complete,
nothing published), ``request_during_publish`` (``vN`` is in place, the ledger does not record it yet).
``once=FILE``: only the first time (the file records it), so a restarted run goes on."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def inject(point: str, epoch: int, rank: int = 0, step: int | None = None) -> bool:
    spec = os.environ.get("UNLEARN_FAULT")
    if not spec:
        return False
    where, when, *options = spec.split(":")
    opts = dict(o.split("=", 1) for o in options)
    if where != point or int(when) != epoch or ("rank" in opts and int(opts["rank"]) != rank):
        return False
    if "step" in opts and step is not None and int(opts["step"]) != step:
        return False
    if "once" in opts:
        marker = Path(opts["once"])
        if marker.exists():
            return False
        marker.write_text(f"{opts.get('do', 'kill')} rank {rank} at {point} of epoch {epoch}\n")
    action = opts.get("do", "kill")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "hang":
        time.sleep(10**6)
    elif action == "nan":
        return True
    else:
        raise ValueError(f"UNLEARN_FAULT: unknown action {action!r} (kill, term, hang, nan)")
    return False
