"""The ``unlearn`` program's exit: a distributed rank leaves by ``os._exit`` (past native teardown that can abort a
finished gloo rank) with main's exit code and its output flushed; one process exits the ordinary way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# an atexit handler stands for the interpreter's teardown: it runs on an ordinary exit and is skipped by os._exit
PROGRAM = """
import atexit, sys
atexit.register(lambda: print("interpreter teardown ran", flush=True))
sys.argv = ["unlearn", *sys.argv[1:]]
from engine.cli import entry
entry()
"""


@pytest.mark.parametrize("world_size, teardown", [("2", False), (None, True)])
def test_a_rank_leaves_with_mains_code_and_its_output_and_one_process_exits_normally(world_size, teardown):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if world_size:
        env["WORLD_SIZE"] = world_size
    # `unlearn verify` without its arguments: main prints one error line and returns 2
    proc = subprocess.run([sys.executable, "-c", PROGRAM, "verify"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unlearn verify needs RECEIPT and MODEL_DIR"), last
    assert ("interpreter teardown ran" in proc.stdout) is teardown
