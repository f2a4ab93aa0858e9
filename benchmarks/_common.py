"""Small helpers shared by the benchmark scripts: where and when a result was produced, and how it is written.

Every benchmark writes ``results.json`` (machine-readable) and ``results.md`` (for people), both headed by the
same facts: the command line, the git commit of the checkout, the machine and the date, so a number can always be
traced back to what produced it. Files are written atomically (temporary name in the same folder, then
``os.replace``), so a reader never sees a half-written result.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Formatting and atomic writes are the engine's own (engine/eval/report.py): one implementation for both.
from engine.eval.report import DASH, fmt, md_table, num  # noqa: F401  (re-exported)
from engine.io import json_safe  # noqa: F401
from engine.io import write_text_atomic as write_text  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
# the shipped configs name hub ids; offline, our copies are read through the mirror mechanism (README, "Data")
if (REPO.parent / "shared" / "data").is_dir():
    os.environ.setdefault("UNLEARN_DATA_MIRROR", str(REPO.parent / "shared" / "data"))


def git_commit(repo: Path = REPO) -> str | None:
    """``git rev-parse --short HEAD`` of ``repo`` (with ``+dirty`` when tracked files changed), or None."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0 or not head.stdout.strip():
            return None
        commit = head.stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> str:
    """Platform, CPU count and the CPU cores this process may use (they differ under a cgroup/affinity)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    proc = platform.processor() or platform.machine()
    return f"{platform.platform()} ({proc}), {os.cpu_count()} CPUs ({usable} usable)"


def run_header(argv: list[str] | None = None) -> dict:
    """The facts every result starts with: command, commit, machine, date, versions."""
    import torch

    args = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(shlex.quote(a) for a in ["python", _script_path(), *args]),
        "commit": git_commit(),
        "machine": machine(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _script_path() -> str:
    main = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if main is None or not main.exists():
        return "benchmarks/<script>.py"
    try:
        return str(main.relative_to(REPO))
    except ValueError:
        return str(main)


def header_markdown(header: dict) -> list[str]:
    """The header as Markdown bullet lines."""
    return [
        f"- Command: `{header.get('command', DASH)}`",
        f"- Commit: `{header.get('commit') or 'unknown (not a git checkout)'}`",
        f"- Machine: {header.get('machine', DASH)}",
        f"- Date: {header.get('date', DASH)}",
        f"- Python {header.get('python', DASH)}, torch {header.get('torch', DASH)}, "
        f"{header.get('torch_threads', DASH)} torch thread(s)",
    ]


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (strict: no NaN) to ``path`` atomically."""
    write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def quiet_log(t_start: float):
    """Silence the progress bars `logging.progress=false` does not reach ("Generating ... split" from datasets on
    every data load, "Writing model shards" from transformers on every save); returns a ``log(msg)`` that stamps
    each line with the seconds since ``t_start``."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    return log
