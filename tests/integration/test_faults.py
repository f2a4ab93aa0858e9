"""Every case of the fault suite (engine/testing.py; benchmarks/faults.py writes its table) as a test: the real command line, real
faults (SIGKILL, SIGTERM, NaN, a hanging rank, a full tmpfs, damaged files) and real bad requests.
A case passes when the run did what its ``expected`` says: exit status, message, what is left on disk,
and for every resumed run the exact weights of the uninterrupted run (torch.equal on every tensor)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from engine.testing import CASES, Context, run_case


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_lm, tiny_cifar) -> Context:
    return Context(tmp_path_factory.mktemp("faults"), quick=True, lm=tiny_lm, cifar=tiny_cifar)


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.full
@pytest.mark.parametrize("name", [n for n, _, _ in CASES])
def test_fault_case(ctx, name):
    if name == "disk full during a save" and not _can_mount_tmpfs():
        pytest.skip("mounting a size-limited tmpfs needs root or user namespaces (unshare -m)")
    result = run_case(ctx, name)
    assert result["passed"], f"{name}: expected {result['expected']}; observed {result['observed']}"
