"""The pytest fixtures: one thread per process (2-core machines), the data folder (../shared/data beside
the checkout, as UNLEARN_DATA_MIRROR unless it is set), a tiny real CIFAR-10 and a tiny Llama built once per
session, a Ray head, the single-process TOFU references; the plain helpers they use are engine/testing.py's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.testing import free_port, make_tiny_cifar, make_tiny_lm, ray_env, tofu_overrides

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
# the shipped configs name hub ids; the tests read our local copies through the mirror mechanism
if (ROOT.parent / "shared" / "data").is_dir():
    os.environ.setdefault("UNLEARN_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
TOFU = Path(os.environ.get("UNLEARN_DATA_MIRROR", ROOT.parent / "shared" / "data")) / "tofu"


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A tiny real CIFAR-10 (engine.testing.make_tiny_cifar)."""
    return make_tiny_cifar(tmp_path_factory.mktemp("tiny_cifar"))


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer folder (engine.testing.make_tiny_lm)."""
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def ray_submit(dashboard: str, config: str, overrides: list[str]) -> str:
    """`launchers/ray_submit.sh DASHBOARD CONFIG overrides...` from the repository, as a user runs it; asserts it
    succeeded and returns its output. A fresh head answers HTTP before its job agent registers: that answer
    alone is retried."""
    import subprocess
    import sys
    import time

    env = {**ray_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for _ in range(48):
        proc = subprocess.run(["bash", "launchers/ray_submit.sh", dashboard, config, *overrides], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1200)  # fmt: skip
        logs = proc.stdout + proc.stderr
        if "No available agent to submit job" not in logs:
            break
        time.sleep(5)
    assert proc.returncode == 0, logs[-4000:]
    assert "succeeded" in logs and "Ray Train run in" in logs
    return logs


@pytest.fixture(scope="session")
def ray_head():
    """One Ray head node on 127.0.0.1 for the Ray tests that join a cluster, started once per test session (per
    pytest-xdist worker that runs such tests) as a child process with a short temp dir; only this head is
    stopped at the end, by its pid (never `ray stop`, which stops every Ray on the machine). Yields
    ``{"address": GCS address, "dashboard": job API URL}``."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    bin_dir = Path(sys.executable).parent
    env = {**ray_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Unix socket paths must stay under 107 bytes
    gcs, dash = free_port(), free_port()
    # every port of its own: two heads at once (the Ray test files on two pytest-xdist workers) would otherwise
    # both want the dashboard agent's default ports, and the second head's job agent never registers
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "runtime-env-agent-port", "metrics-export-port",
                                                     "ray-client-server-port")]  # fmt: skip
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *ports, "--num-cpus=3", f"--temp-dir={temp}",
         "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    info = {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}"}
    try:
        for _ in range(120):  # the job API answers once the dashboard is up
            try:
                urllib.request.urlopen(f"{info['dashboard']}/api/version", timeout=2)
                break
            except OSError:
                if head.poll() is not None:
                    pytest.fail(f"the Ray head exited with status {head.returncode}")
                time.sleep(1)
        yield info
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


# every single-process TOFU reference the distributed tests compare with: SCRUB, 2 epochs of max+min, a
# learning rate that really moves a tiny model, forget batches of 3 (20 forget rows: the last batch has 2 rows,
# so with 2 ranks x 2 micro-batches some are stand-ins)
DIST_RUN = {"eval.reference": "null", "method.lr": "0.003", "method.forget_batch_size": "3"}


@pytest.fixture(scope="session")
def tofu_reference(tiny_lm, tmp_path_factory):
    """``tofu_reference(**overrides)``: the output folder of the single-process `unlearn run configs/tofu.yaml`
    with DIST_RUN and ``overrides`` (an override of None leaves that key out), run once per session for each distinct set of overrides (the reference
    several distributed tests compare their weights with)."""
    from engine.cli import main

    done: dict[tuple, Path] = {}

    def reference(**overrides) -> Path:
        key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
        if key not in done:
            out = tmp_path_factory.mktemp("reference") / "out"
            # a method switch first: the method.* overrides after it apply to that method
            first = {"method": overrides["method"]} if "method" in overrides else {}
            args = tofu_overrides(tiny_lm, out.parent, output_dir=out, **{**first, **DIST_RUN, **overrides})
            assert main(["run", "configs/tofu.yaml", *args]) == 0
            done[key] = out
        return done[key]

    return reference
