"""The Ray backend for real on loopback: an embedded local Ray, Ray Train with 2 CPU workers (DeepSpeed
ZeRO-3 inside each), the forget and retain rows tokenized in Ray Data and fetched per epoch by each
worker. Compared with the single-process run of the same global batches (tolerance as in
test_deepspeed.py: float32 summation order, measured 1.3e-6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import tofu_overrides

REPO = Path(__file__).resolve().parents[2]
RUN = {"eval.reference": "null", "method.lr": "0.003", "method.forget_batch_size": "3"}


def test_ray_train_two_workers_zero3_equal_the_single_process(tiny_lm, tmp_path):
    single = tmp_path / "single"
    ray_out = tmp_path / "ray"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # fmt: skip
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    for key in ("RAY_ADDRESS", "RANK", "WORLD_SIZE", "UNLEARN_FAULT"):
        env.pop(key, None)

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
