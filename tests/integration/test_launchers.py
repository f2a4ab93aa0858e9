"""The launchers start real multi-process DeepSpeed runs on this machine (gloo, loopback only): the
`deepspeed` launcher and `accelerate launch` with two processes, and launchers/slurm_deepspeed.sbatch under
stand-in `srun` and `scontrol` commands that start its tasks locally the way Slurm would set them up."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine.testing import free_port, tofu_overrides
from tests.conftest import ROOT

VENV_BIN = Path(sys.executable).parent
# each run takes about 20 s on 2 idle cores once DeepSpeed's CPU op is compiled (about 45 s more the
# first time, in TORCH_EXTENSIONS_DIR)
TIMEOUT_S = 900  # ~30 s each on a quiet 2-core machine; generous for a loaded one
RUN = {
    "tofu.num_authors": "5",
    "method.epochs": "1",
    "method.msteps": "1",
    "method.lr": "0.003",
    "eval.reference": "null",
    # a rank that fails leaves the others waiting in a collective: fail them in minutes, not the default 10
    "backend.timeout_s": "300",
}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # a test run inside another launcher's process must not join that world
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions")),
        **extra,
    )
    return env


def _run(cmd: list[str], env: dict[str, str]) -> None:
    """Run a launcher to completion. Its own session, so that a timeout ends the ranks it started too
    (subprocess.run would kill only the launcher and leave them running)."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"{cmd[:3]} ran over {TIMEOUT_S} s:\n{stdout[-4000:]}\n{stderr[-4000:]}"
        ) from None
    assert proc.returncode == 0, f"{cmd[:3]} exited {proc.returncode}:\n{stdout[-4000:]}\n{stderr[-4000:]}"


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.full
def test_deepspeed_launcher_two_processes(tiny_lm, tmp_path):
    from transformers import AutoTokenizer

    cmd = [
        str(VENV_BIN / "deepspeed"),
        # no hostfile: never the default /job/hostfile, so the two processes start on this machine
        "--hostfile", str(tmp_path / "no_hostfile"),
        "--num_gpus", "2",  # on CPU: processes
        "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()),
        "--module", "engine.cli", "run", "configs/tofu.yaml",
        *tofu_overrides(tiny_lm, tmp_path, **RUN),
        "backend.name=deepspeed",
        "backend.zero_stage=2",
    ]  # fmt: skip
    _run(cmd, _env())
    out = tmp_path / "out"
    model = _two_rank_run_changed_the_model(out, tiny_lm, zero_stage=2)
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    ids = tokenizer("Who wrote it?", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tokenizer)


def _two_rank_run_changed_the_model(out: Path, base: Path, zero_stage: int):
    """The run in ``out`` ran on 2 DeepSpeed ranks at ``zero_stage`` and exported a changed model of the base's
    keys; returns the exported model."""
    from transformers import AutoModelForCausalLM

    report = _report(out)
    assert report["backend"]["name"] == "deepspeed"
    assert report["backend"]["world_size"] == 2 and report["backend"]["zero_stage"] == zero_stage
    assert [row["rank"] for row in report["memory"]] == [0, 1]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = model.state_dict()
    assert set(after) == set(before)
    assert any(not (before[k] == after[k]).all() for k in before), "the run left the model unchanged"
    return model


def _accelerate(tmp_path: Path, *flags: str) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch FLAGS` with the options it would otherwise ask for or warn about, and its
    environment: HF_HOME in tmp_path, so that no default_config.yaml of this machine's user applies."""
    cmd = [
        str(VENV_BIN / "accelerate"), "launch", *flags,
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    return cmd, _env(HF_HOME=str(tmp_path / "hf_home"))


@pytest.mark.full
def test_accelerate_launcher_two_processes(tiny_lm, tmp_path):

    # --multi_gpu is accelerate's torchrun (torch.distributed.run) path, which also runs on CPU;
    # --cpu would start one process (test_accelerate_misleading_flags_refused)
    cmd, env = _accelerate(tmp_path, "--multi_gpu", "--num_processes", "2")
    cmd += [
        "-m", "engine.cli", "run", "configs/tofu.yaml",
        *tofu_overrides(tiny_lm, tmp_path, **RUN),
        "backend.name=deepspeed",
        "backend.zero_stage=1",
    ]  # fmt: skip
    _run(cmd, env)
    _two_rank_run_changed_the_model(tmp_path / "out", tiny_lm, zero_stage=1)


@pytest.mark.full
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # accelerate's plain launcher: one process with MASTER_ADDR but no RANK, not a world of two
        (["--cpu", "--num_processes", "2"], "accelerate launch --cpu"),
        # accelerate's DeepSpeed flags feed its Accelerator, which the engine doesn't use (one process is
        # enough to be refused)
        (
            ["--use_deepspeed", "--num_processes", "1", "--zero_stage", "3"],
            "ACCELERATE_DEEPSPEED_ZERO_STAGE=3",
        ),
    ],
    ids=["cpu", "use_deepspeed_stage"],
)
def test_accelerate_misleading_flags_refused(tiny_lm, tmp_path, flags, message):
    cmd, env = _accelerate(tmp_path, *flags)
    cmd += [
        "-m", "engine.cli", "run", "configs/tofu.yaml",
        *tofu_overrides(tiny_lm, tmp_path, **RUN),
        "backend.name=deepspeed",
        "backend.zero_stage=2",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stderr[-4000:]
    assert not (tmp_path / "out").exists()


FAKE_SRUN = """#!/usr/bin/env bash
# srun on one machine: $SLURM_NTASKS local copies of the command, with the variables Slurm gives a task.
set -u
printf '%s\\n' "$*" >> "$FAKE_SLURM_LOG"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done  # srun's own options
export SLURM_NTASKS SLURM_NTASKS_PER_NODE SLURM_JOB_NODELIST SLURM_NODEID=0
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
    pids+=("$!")
done
status=0
for _ in "${pids[@]}"; do
    if ! wait -n; then
        status=1
        kill "${pids[@]}" 2>/dev/null  # as --kill-on-bad-exit: don't leave the others in a collective
    fi
done
exit "$status"
"""

# two hosts, both this machine: the script must take the first line only
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ $1 == show && $2 == hostnames ]] || { echo "fake scontrol: $*" >&2; exit 1; }
printf '127.0.0.1\\n127.0.0.1\\n'
"""


@pytest.mark.full
def test_slurm_script_under_fake_srun(tiny_lm, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "srun.log"
    env = _env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHON=sys.executable,
        MASTER_PORT=str(free_port()),
        FAKE_SLURM_LOG=str(log),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_CPUS_PER_TASK="1",
    )
    cmd = [
        "bash",
        "launchers/slurm_deepspeed.sbatch",
        "configs/tofu.yaml",
        *tofu_overrides(tiny_lm, tmp_path, **RUN),
        "backend.zero_stage=3",
    ]
    _run(cmd, env)
    report = _report(tmp_path / "out")
    assert report["backend"]["name"] == "deepspeed"
    assert report["backend"]["world_size"] == 2 and report["backend"]["zero_stage"] == 3
    assert [row["rank"] for row in report["memory"]] == [0, 1]
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    srun_args = log.read_text().split()
    assert "--kill-on-bad-exit=1" in srun_args and "--cpus-per-task=1" in srun_args


def test_slurm_script_needs_a_config(tmp_path):
    proc = subprocess.run(
        ["bash", "launchers/slurm_deepspeed.sbatch"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2 and "usage: sbatch launchers/slurm_deepspeed.sbatch CONFIG" in proc.stderr
