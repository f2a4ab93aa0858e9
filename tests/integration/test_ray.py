"""The Ray backend for real on loopback: Ray Train with 2 CPU workers (DeepSpeed ZeRO inside each), the
forget and retain rows tokenized once in Ray Data into token stores each worker reads its own rows from.
Compared with the single-process run of the same global batches (tolerance as in test_deepspeed.py:
float32 summation order, measured 1.3e-6). One run starts an embedded local Ray, as a user's first run
does; the others join one head node started once for the session (``ray_head`` in conftest.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from engine.testing import ray_env, tofu_overrides
from tests.conftest import DIST_RUN, ray_submit

REPO = Path(__file__).resolve().parents[2]
RUN = DIST_RUN
TOL = 2e-5


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_ray_train_two_workers_zero3_equal_the_single_process(tiny_lm, tofu_reference, tmp_path):
    ray_out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "engine.cli", "run", "configs/tofu.yaml",
           *tofu_overrides(tiny_lm, tmp_path, output_dir=ray_out, **RUN, **{"backend.name": "ray",
                           "backend.num_workers": "2", "backend.zero_stage": "3"})]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Ray Train run in" in proc.stdout + proc.stderr  # where results and checkpoints went
    assert max_diff(ray_out, tofu_reference()) < TOL
    report = json.loads((ray_out / "report.json").read_text())
    assert report["backend"]["world_size"] == 2 and report["backend"]["zero_stage"] == 3
    assert report["seconds_to_first_step"] > 0
    assert all(row["ray_report_seconds"] >= 0 for row in report["history"][1:])  # each epoch was reported
    shards = json.loads((ray_out / "shards.json").read_text())
    for stream in ("forget", "retain"):
        for epoch, ranks in shards[stream].items():
            assert ranks["0"] and ranks["1"] and not set(ranks["0"]) & set(ranks["1"]), (stream, epoch)
    assert not ray_out.with_name("ray.tokens").exists()  # the tokenized rows are not left behind


@pytest.mark.full
def test_fan_out_runs_independent_runs_as_ray_tasks_and_gathers_their_results(tiny_lm, tmp_path, monkeypatch):
    """In this process, on an embedded Ray of its own: ray.init from the pytest process hung connecting to the
    session's head node (in Node._init_gcs_client), which the command-line drivers of the other tests join."""
    import ray

    from engine.launch.ray_tasks import fan_out

    def run_cli(argv: list[str]) -> int:  # defined here: Ray pickles it by value into each task
        import torch

        from engine.cli import main

        torch.set_num_threads(1)  # one CPU per task
        return main(argv)

    for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.setenv(key, ray_env()[key])
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


@pytest.mark.full
def test_ray_submit_runs_a_real_job_on_a_head_node_started_here(tiny_lm, tofu_reference, tmp_path, ray_head):
    """A real job through launchers/ray_submit.sh against the session's head node on 127.0.0.1."""
    out = tmp_path / "job"
    epochs = {"method.epochs": "1", "method.msteps": "1"}
    overrides = tofu_overrides(tiny_lm, tmp_path, output_dir=out, **RUN, **epochs,
                               **{"backend.num_workers": "2", "backend.zero_stage": "2", "backend.timeout_s": "120"})  # fmt: skip
    ray_submit(ray_head["dashboard"], "configs/tofu.yaml", overrides)
    report = json.loads((out / "report.json").read_text())
    assert report["backend"]["world_size"] == 2 and report["backend"]["zero_stage"] == 2
    # Ray Train recorded the epoch's checkpoint (a pointer to the DeepSpeed checkpoint of that epoch)
    assert list((tmp_path / "job.ray" / "job").glob("checkpoint_*/deepspeed_checkpoint.txt"))
    # ZeRO-2 on 2 workers: the single process's weights (as for ZeRO-3 above)
    assert max_diff(out, tofu_reference(**epochs)) < TOL


@pytest.mark.full
def test_a_killed_worker_restarts_the_group_which_resumes_from_the_last_checkpoint(
    tiny_lm, tofu_reference, tmp_path, ray_head
):
    """max_failures=1: worker 1 is SIGKILLed right after epoch 1's checkpoint (once); Ray Train restarts the
    worker group, which resumes from that checkpoint, says so, and ends with the weights of an
    uninterrupted run (the single process's, within the float32 tolerance of 2 ranks). The fault reaches the
    head's workers through the job's runtime environment (init_ray hands UNLEARN_* variables on)."""
    marker = tmp_path / "killed"
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "engine.cli", "run", "configs/tofu.yaml",
           *tofu_overrides(tiny_lm, tmp_path, output_dir=out, **RUN,
                           **{"backend.name": "ray", "backend.num_workers": "2", "backend.zero_stage": "2",
                              "backend.max_failures": "1", "backend.timeout_s": "60",
                              "backend.ray_address": ray_head["address"]})]  # fmt: skip
    env = {**ray_env(), "UNLEARN_FAULT": f"after_checkpoint:1:rank=1:once={marker}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert marker.is_file(), "the fault did not fire"
    assert "resuming from the checkpoint of epoch 1" in logs
    assert json.loads((out / "report.json").read_text())["resumed_from_epoch"] == 1
    assert max_diff(out, tofu_reference()) < TOL


@pytest.mark.full
def test_sigterm_to_the_driver_checkpoints_at_the_next_step_and_the_rerun_resumes(
    tiny_lm, tofu_reference, tmp_path, ray_head
):
    """`ray job stop` and a preempted head signal the driver only: it relays the request through a stop file,
    the 2 workers checkpoint at their next step and end, the driver exits 75; the same command resumes
    mid-epoch and ends with the weights of an uninterrupted run (the single process's, within the float32
    tolerance of 2 ranks)."""
    env = ray_env()
    ray = {
        "backend.name": "ray",
        "backend.num_workers": "2",
        "backend.zero_stage": "2",
        "backend.ray_address": ray_head["address"],
    }  # fmt: skip  (2 epochs)

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
    assert max_diff(out, tofu_reference()) < TOL


@pytest.mark.full
def test_ray_data_tokenizes_a_set_of_several_blocks_into_the_in_memory_streams_batches(
    tiny_lm, tmp_path, monkeypatch
):
    """A set larger than a block goes through Ray Data (here 30 real TOFU rows in blocks of 7, on an
    embedded Ray in this process): the store holds exactly the batches the in-memory stream gives."""
    import ray

    import engine.launch.ray_train as ray_train
    from engine.data.text import QAFormatter
    from engine.models.causal_lm import load_tokenizer
    from tests.conftest import TOFU
    from tests.unit.test_token_store import _assert_same_batches

    for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.setenv(key, ray_env()[key])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calls = []
    ray_data = ray_train.tokenize_to_store
    monkeypatch.setattr(ray_train, "tokenize_to_store", lambda *a, **k: calls.append(k) or ray_data(*a, **k))
    tok = load_tokenizer(str(tiny_lm))
    formatter = QAFormatter(tok, max_length=96)
    rows = [json.loads(line) for line in (TOFU / "forget10.jsonl").read_text().splitlines()[:30]]
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2)
    try:
        stores = ray_train.write_stores({"retain": rows}, formatter, tmp_path / "run", rows_per_block=7)
    finally:
        ray.shutdown()
    assert len(calls) == 1  # through Ray Data
    _assert_same_batches(stores["retain"], rows, formatter, tok.pad_token_id)
