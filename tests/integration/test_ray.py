"""The Ray backend for real on loopback: an embedded local Ray, Ray Train with 2 CPU workers (DeepSpeed
ZeRO-3 inside each), the forget and retain rows tokenized in Ray Data and fetched per epoch by each
worker. Compared with the single-process run of the same global batches (tolerance as in
test_deepspeed.py: float32 summation order, measured 1.3e-6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import tofu_overrides

REPO = Path(__file__).resolve().parents[2]
RUN = {"eval.reference": "null", "method.lr": "0.003", "method.forget_batch_size": "3"}


def ray_env() -> dict:
    """Subprocess environment: Ray kept on loopback, no usage stats, an explicit auth mode (the same for a
    head and its clients), one thread per process, and no launcher or fault variables from outside."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # fmt: skip
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    for key in ("RAY_ADDRESS", "RANK", "WORLD_SIZE", "UNLEARN_FAULT"):
        env.pop(key, None)
    return env


def test_ray_train_two_workers_zero3_equal_the_single_process(tiny_lm, tmp_path):
    single = tmp_path / "single"
    ray_out = tmp_path / "ray"
    env = ray_env()

    def run(out: Path, **extra) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "engine.cli", "run", "configs/tofu.yaml",
               *tofu_overrides(tiny_lm, tmp_path, output_dir=out, **RUN, **extra)]  # fmt: skip
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)

    proc = run(ray_out, **{"backend.name": "ray", "backend.num_workers": "2", "backend.zero_stage": "3"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Ray Train run in" in proc.stdout + proc.stderr  # where results and checkpoints went
    assert run(single).returncode == 0
    a, b = (
        load_file(ray_out / "model" / "model.safetensors"),
        load_file(single / "model" / "model.safetensors"),
    )
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2e-5
    report = json.loads((ray_out / "report.json").read_text())
    assert report["backend"]["world_size"] == 2 and report["backend"]["zero_stage"] == 3
    assert report["seconds_to_first_step"] > 0
    shards = json.loads((ray_out / "shards.json").read_text())
    for stream in ("forget", "retain"):
        for epoch, ranks in shards[stream].items():
            assert ranks["0"] and ranks["1"] and not set(ranks["0"]) & set(ranks["1"]), (stream, epoch)


def test_fan_out_runs_independent_runs_as_ray_tasks_and_gathers_their_results(tiny_lm, tmp_path, monkeypatch):
    import ray

    from engine.backends.ray_train import fan_out, run_cli

    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    lrs = ["0.001", "0.002"]
    jobs = [
        ["run", str(REPO / "configs/tofu.yaml"),
         *tofu_overrides(tiny_lm, tmp_path, **{**RUN, "method.lr": lr, "method.epochs": "1", "method.msteps": "1",
                                                "output_dir": str(tmp_path / f"run{i}")})]
        for i, lr in enumerate(lrs)
    ]  # fmt: skip
    try:
        assert fan_out(run_cli, jobs, num_cpus=1) == [0, 0]
    finally:
        ray.shutdown()
    for i, lr in enumerate(lrs):  # each task's own run, gathered in the items' order
        assert json.loads((tmp_path / f"run{i}" / "report.json").read_text())["method"]["lr"] == float(lr)


def test_ray_submit_runs_a_real_job_on_a_head_node_started_here(tiny_lm, tmp_path):
    """A head node as a child process on 127.0.0.1 (short temp dir, explicit auth mode), a real job through
    launchers/ray_submit.sh, then only that head is stopped, by its pid."""
    import shutil
    import socket
    import tempfile
    import time
    import urllib.request

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    venv_bin = Path(sys.executable).parent
    env = {**ray_env(), "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Unix socket paths must stay under 107 bytes
    dash = port()
    head = subprocess.Popen(
        [str(venv_bin / "ray"), "start", "--head", f"--port={port()}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=3", f"--temp-dir={temp}", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        for _ in range(120):  # the job API answers once the dashboard is up
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                time.sleep(1)
        out = tmp_path / "job"
        overrides = tofu_overrides(tiny_lm, tmp_path, output_dir=out, **RUN,
                                   **{"backend.num_workers": "2", "backend.zero_stage": "2", "method.epochs": "1",
                                      "method.msteps": "1", "backend.timeout_s": "120"})  # fmt: skip
        for _ in range(48):  # a fresh head answers HTTP before its job agent registers: retry that only
            proc = subprocess.run(["bash", "launchers/ray_submit.sh", address, "configs/tofu.yaml", *overrides],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
            logs = proc.stdout + proc.stderr
            if "No available agent to submit job" not in logs:
                break
            time.sleep(5)
        assert proc.returncode == 0, logs[-4000:]
        assert "succeeded" in logs and "Ray Train run in" in logs
        report = json.loads((out / "report.json").read_text())
        assert report["backend"]["world_size"] == 2 and report["backend"]["zero_stage"] == 2
        # Ray Train recorded the epoch's checkpoint (a pointer to the DeepSpeed checkpoint of that epoch)
        assert list((tmp_path / "job.ray" / "job").glob("checkpoint_*/deepspeed_checkpoint.txt"))
        # ZeRO-2 on 2 workers: the single process's weights (as for ZeRO-3 above)
        single = tmp_path / "single"
        solo = [o.replace(str(out), str(single)) for o in overrides if not o.startswith("backend.")]
        assert subprocess.run([sys.executable, "-m", "engine.cli", "run", "configs/tofu.yaml", *solo],
                              cwd=REPO, env=env, capture_output=True).returncode == 0  # fmt: skip
        a, b = (
            load_file(out / "model" / "model.safetensors"),
            load_file(single / "model" / "model.safetensors"),
        )
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2e-5
    finally:
        head.terminate()  # this head only: never `ray stop`, which stops every Ray on the machine
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_killed_worker_restarts_the_group_which_resumes_from_the_last_checkpoint(tiny_lm, tmp_path):
    """max_failures=1: worker 1 is SIGKILLed right after epoch 1's checkpoint (once); Ray Train restarts the
    worker group, which resumes from that checkpoint, says so, and ends with the weights of an
    uninterrupted run (the single process's, within the float32 tolerance of 2 ranks)."""
    marker = tmp_path / "killed"
    env = ray_env()

    def run(out: Path, fault: str | None = None, **extra) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "engine.cli", "run", "configs/tofu.yaml",
               *tofu_overrides(tiny_lm, tmp_path, output_dir=out, **RUN, **extra)]  # fmt: skip
        run_env = {**env, "UNLEARN_FAULT": fault} if fault else env
        return subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=1500)

    out = tmp_path / "ray"
    proc = run(out, fault=f"after_checkpoint:1:rank=1:once={marker}",
               **{"backend.name": "ray", "backend.num_workers": "2", "backend.zero_stage": "2",
                  "backend.max_failures": "1", "backend.timeout_s": "60"})  # fmt: skip
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert marker.is_file(), "the fault did not fire"
    assert "resuming from the checkpoint of epoch 1" in logs
    assert json.loads((out / "report.json").read_text())["resumed_from_epoch"] == 1
    single = tmp_path / "single"
    assert run(single).returncode == 0
    a, b = load_file(out / "model" / "model.safetensors"), load_file(single / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2e-5


def test_sigterm_to_the_driver_checkpoints_at_the_next_step_and_the_rerun_resumes(tiny_lm, tmp_path):
    """`ray job stop` and a preempted head signal the driver only: it relays the request through a stop file,
    the 2 workers checkpoint at their next step and end, the driver exits 75; the same command resumes
    mid-epoch and ends with the weights of an uninterrupted run (the single process's, within the float32
    tolerance of 2 ranks)."""
    env = ray_env()
    ray = {"backend.name": "ray", "backend.num_workers": "2", "backend.zero_stage": "2"}  # 2 epochs

    def command(out: Path, **extra) -> list[str]:
        return [sys.executable, "-m", "engine.cli", "run", "configs/tofu.yaml",
                *tofu_overrides(tiny_lm, tmp_path, output_dir=out, **RUN, **extra)]  # fmt: skip

    out = tmp_path / "ray"
    driver = subprocess.Popen(command(out, **ray), cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    first = out.with_name("ray.partial") / "checkpoints" / "epoch_1" / "manifest.json"
    deadline = time.time() + 900
    while not first.exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGTERM)  # all of epoch 2 is left: the run cannot end first
    logs = driver.communicate(timeout=300)[0]
    assert driver.returncode == 75, logs[-4000:]
    tags = [p.parent.name for p in first.parents[1].glob("*/manifest.json")]
    assert any(t.startswith("epoch_2-") for t in tags), (tags, logs[-3000:])  # mid-epoch, not epoch 2's end
    again = subprocess.run(
        command(out, **ray), cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "step" in json.loads((out / "report.json").read_text())["resume"]["position"]
    single = tmp_path / "single"
    assert subprocess.run(command(single), cwd=REPO, env=env, timeout=1200).returncode == 0
    a, b = load_file(out / "model" / "model.safetensors"), load_file(single / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2e-5
