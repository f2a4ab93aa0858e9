"""The DeepSpeed backend for real: 2 processes over gloo on CPU (torchrun), a tiny Llama, real TOFU rows.

Every distributed run here is compared with the single-process run of the same global batches. The
tolerance: both compute in float32, but 2 ranks sum their half of each batch separately and all-reduce
the gradients (another summation order), so weights agree to accumulated float32 rounding: measured
about 1e-6 after the run's 2 epochs. 2e-5 leaves margin while a real fault (a wrong normaliser, a rank
training on the wrong rows, a missed step) moves weights by 1e-3 to 1e-1 here (they move ~0.08 in all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main
from engine.testing import free_port, tofu_overrides
from tests.conftest import DIST_RUN

REPO = Path(__file__).resolve().parents[2]
TOL = 2e-5
RUN = DIST_RUN  # SCRUB, 2 epochs, forget batches of 3: some micro-batches are stand-ins (conftest.py)


def torchrun(overrides: list[str], fault: str | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env.pop("UNLEARN_FAULT", None)
    if fault:
        env["UNLEARN_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "engine.cli", "run", "configs/tofu.yaml", *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def ds(tiny_lm, out: Path, **extra) -> list[str]:
    return tofu_overrides(
        tiny_lm, out.parent, output_dir=out, **RUN, **{"backend.name": "deepspeed", **extra}
    )


@pytest.fixture(scope="module")
def single(tofu_reference) -> Path:
    """The single-process run every distributed run here must equal (shared with test_ray.py)."""
    return tofu_reference()


@pytest.fixture(scope="module")
def zero3(tiny_lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3") / "out"
    # the teacher loaded and sharded (not its cached outputs), against a single process that caches them
    proc = torchrun(ds(tiny_lm, out, **{"backend.zero_stage": "3", "method.teacher_cache": "off"}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def test_zero3_on_two_ranks_ends_with_the_single_process_weights(single, zero3, tiny_lm):
    moved = max_diff(weights(single), load_file(tiny_lm / "model.safetensors"))
    assert moved > 1e-2, "the run must really change the model for the comparison to mean anything"
    assert max_diff(weights(zero3), weights(single)) < TOL
    r = report(zero3)
    assert r["backend"] == {"name": "deepspeed", "world_size": 2, "zero_stage": 3, "accumulation": 1}


@pytest.mark.full
def test_zero2_with_gradient_accumulation_ends_with_the_single_process_weights(single, tiny_lm, tmp_path):
    out = tmp_path / "zero2"
    proc = torchrun(
        ds(tiny_lm, out, **{"backend.zero_stage": "2", "backend.gradient_accumulation_steps": "2"})
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert max_diff(weights(out), weights(single)) < TOL
    # the per-step losses logged are the global batch's, equal to the single process's
    a, b = report(out)["losses"], report(single)["losses"]
    for phase in ("max", "min"):
        assert len(a[phase]) == len(b[phase])
        assert a[phase] == pytest.approx(b[phase], rel=1e-4)


@pytest.mark.full
@pytest.mark.parametrize("stage", ["0", "1"])
def test_zero0_and_zero1_end_with_the_single_process_weights(single, tiny_lm, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    proc = torchrun(ds(tiny_lm, out, **{"backend.zero_stage": stage}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert max_diff(weights(out), weights(single)) < TOL


def test_each_rank_trained_on_a_distinct_shard_of_forget_and_retain(zero3):
    shards = json.loads((zero3 / "shards.json").read_text())
    size = report(zero3)["forget"]["size"]
    unions = {}
    for stream in ("forget", "retain"):
        for epoch in ("1", "2"):
            a, b = set(shards[stream][epoch]["0"]), set(shards[stream][epoch]["1"])
            assert a and b and not a & b, f"{stream} epoch {epoch}: ranks overlap or one is empty"
            unions[stream, epoch] = a | b
    assert len(unions["forget", "1"]) == size  # together the ranks cover the forget set once per epoch
    assert unions["forget", "1"] == unions["forget", "2"] and unions["retain", "1"] == unions["retain", "2"]
    assert not unions["forget", "1"] & unions["retain", "1"]


def test_teacher_is_bit_identical_before_and_after_and_sharded(zero3):
    teacher = report(zero3)["teacher"]
    assert teacher["unchanged"] is True
    before = teacher["sha256_before"]
    assert len(before) == 2 and before[0] != before[1]  # each rank holds a different ZeRO-3 partition


def test_each_rank_holds_about_half_the_state(single, zero3):
    (one,) = report(single)["memory"]
    two = report(zero3)["memory"]
    assert len(two) == 2
    for rank in two:
        assert rank["parameter_bytes"] <= 0.55 * one["parameter_bytes"]
        assert rank["state_bytes"] <= 0.75 * one["state_bytes"]  # ZeRO adds an fp32 master partition


def test_consolidated_checkpoint_reloads_in_plain_transformers_with_the_single_process_logits(single, zero3):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zero3 / "model")
    batch = tok(["Question: Who wrote it?\nAnswer: the author"], return_tensors="pt")
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(zero3 / "model")(**batch).logits
        b = AutoModelForCausalLM.from_pretrained(single / "model")(**batch).logits
    assert (a - b).abs().max() < 1e-4


@pytest.mark.full
def test_a_run_killed_after_an_epoch_resumes_there_and_ends_as_the_uninterrupted_run(
    zero3, tiny_lm, tmp_path
):
    out = tmp_path / "killed"
    args = ds(tiny_lm, out, **{"backend.zero_stage": "3", "method.teacher_cache": "off"})  # as `zero3`'s run
    first = torchrun(
        args, fault="after_checkpoint:1"
    )  # SIGKILL on every rank right after epoch 1's checkpoint
    assert first.returncode != 0
    assert not out.exists()  # nothing is published before the run completes
    assert (tmp_path / "killed.partial" / "checkpoints" / "latest").read_text() == "epoch_1"
    second = torchrun(args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from the checkpoint of epoch 1" in second.stdout + second.stderr
    assert report(out)["resumed_from_epoch"] == 1
    a, b = weights(out), weights(zero3)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run must end bit-identical on CPU"
    assert not (out / "checkpoints").exists()  # a completed run keeps the exported model, not the shards


def test_resuming_with_another_config_is_refused_before_any_work(tiny_lm, tmp_path, capsys):
    partial = tmp_path / "out.partial"
    (partial / "checkpoints" / "epoch_1").mkdir(parents=True)
    (partial / "checkpoints" / "epoch_1" / "manifest.json").write_text("{}")
    (partial / "config.yaml").write_text("seed: 99\n")
    code = main(["run", "configs/tofu.yaml", *tofu_overrides(tiny_lm, tmp_path, **RUN)])
    assert code != 0
    assert "unfinished run with another config" in capsys.readouterr().err


@pytest.mark.full
def test_zero3_with_optimizer_and_parameter_offload_without_a_launcher(single, tiny_lm, tmp_path):
    """One process started plainly (a world of one), ZeRO-3 with optimizer and parameter offload to CPU:
    DeepSpeed's own CPU Adam (compiled on first use, about 2 minutes once) replaces torch's AdamW, the
    same update rule in another implementation: measured 3.5e-6 from the single-process weights."""
    out = tmp_path / "offload"
    extra = {"backend.zero_stage": "3", "backend.offload_optimizer": "cpu", "backend.offload_param": "cpu"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "UNLEARN_FAULT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "engine.cli", "run", "configs/tofu.yaml", *ds(tiny_lm, out, **extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert max_diff(weights(out), weights(single)) < TOL
    (mem,) = report(out)["memory"]
    assert mem["optimizer_bytes"] >= 2 * mem["parameter_bytes"]  # Adam moments (+ master) live on the host


def test_a_single_process_run_killed_after_an_epoch_resumes_there_too(single, tiny_lm, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "engine.cli", "run", "configs/tofu.yaml",
           *tofu_overrides(tiny_lm, tmp_path, output_dir=out, **RUN)]  # fmt: skip
    first = subprocess.run(
        cmd, cwd=REPO, env={**env, "UNLEARN_FAULT": "after_checkpoint:1"}, capture_output=True
    )
    assert first.returncode != 0 and not out.exists()
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from the checkpoint of epoch 1" in second.stdout
    a, b = weights(out), weights(single)
    assert all(torch.equal(a[k], b[k]) for k in a)


RESET_SCRIPT = '''
import json, sys, torch
from engine.backends.deepspeed import DeepSpeedBackend
from engine.backends.single import SingleProcessBackend
from engine.config import BackendConfig
from engine.methods.base import OptimizerSettings

settings = OptimizerSettings(optimizer="adamw", lr=0.01, weight_decay=0.0, lr_decay_epochs=[])
x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))


def steps(backend, reset: bool) -> dict:
    """Three Adam steps on a fixed loss, the optimizer's state cleared after the first two (or not)."""
    torch.manual_seed(0)
    model, _ = backend.prepare(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 1)), None,
                               settings.build_optimizer)
    for i in range(3):
        sign = 1.0 if i < 2 else -1.0  # two "ascent" steps, then the other way: momentum would carry on
        backend.backward(sign * model(x).pow(2).mean() / backend.world_size)  # each rank: its share of the mean
        backend.step()
        if i == 1 and reset:
            backend.reset_optimizer()
    full = backend.full_state_dict(model)
    return {k: v.tolist() for k, v in (full if full is not None else backend.unwrap(model).state_dict()).items()}


out = {}
for stage in (0, 2, 3):
    ds = DeepSpeedBackend(BackendConfig(name="deepspeed", zero_stage=stage, num_threads=1))
    out[stage] = {"reset": steps(ds, True), "kept": steps(ds, False)}
single = SingleProcessBackend(device="cpu")
out["single"] = {"reset": steps(single, True), "kept": steps(SingleProcessBackend(device="cpu"), False)}
if ds.is_main:
    open(sys.argv[1], "w").write(json.dumps(out))
'''


def test_a_cleared_optimizer_state_steps_as_a_fresh_one_on_two_ranks_at_zero_0_2_and_3(tmp_path):
    """SCRUB's calibrated schedule clears the optimizer's state after a max phase (method.reset_after_max):
    under ZeRO the state lives in the wrapped optimizer's partitions, one level down; the result after the
    clear must be the single process's, and differ from keeping the state (so the clear really happened)."""
    script, result = tmp_path / "reset.py", tmp_path / "out.json"
    script.write_text(RESET_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(result)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(result.read_text())
    as_tensors = {
        run: {k: torch.tensor(v) for k, v in out["single"][run].items()} for run in ("reset", "kept")
    }
    assert max_diff(as_tensors["reset"], as_tensors["kept"]) > 1e-3
    for stage in ("0", "2", "3"):
        for run in ("reset", "kept"):
            got = {k: torch.tensor(v) for k, v in out[stage][run].items()}
            assert max_diff(got, as_tensors[run]) < TOL, (stage, run)
