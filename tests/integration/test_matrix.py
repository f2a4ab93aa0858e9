"""The pipeline matrix: task x backend x method, each cell a real tiny job compared with the single process.

| task | single | deepspeed, 2 ranks (torchrun, gloo) | ray, 2 Ray Train workers |
|---|---|---|---|
| image_classification: SCRUB | reference | ZeRO-3, here | ZeRO-2 via launchers/ray_submit.sh, here |
| image_classification: NegGrad+ | reference | ZeRO-2, here | ZeRO-3, here |
| image_classification: NPO | reference | ZeRO-2, here | |
| image_classification: `unlearn train` | reference | ZeRO-2, here | |
| `unlearn eval`, both tasks | reference | ZeRO-3, here | image_classification ZeRO-3, here |
| causal_lm (TOFU): SCRUB | reference | ZeRO-3, test_deepspeed.py (and ZeRO 0-2) | ZeRO-3, test_ray.py |
| causal_lm (TOFU): GradDiff / NPO | reference | GradDiff ZeRO-3, here | NPO ZeRO-2, here |
| causal_lm (TOFU): SimNPO | reference | ZeRO-3, here | |
| causal_lm (TOFU): IdkNLL, IdkDPO | reference | ZeRO-3, here | refused in one line (workers get token stores) |
| causal_lm (TOFU): UNDIAL | reference | ZeRO-3, here | ZeRO-3, here |
| causal_lm (TOFU): RMU | reference | ZeRO-3, test_rmu_run.py | ZeRO-2, here |

Image classification runs `configs/demo.yaml` on a tiny real CIFAR-10 (3 classes) with a tiny
ViTForImageClassification built from a config: no BatchNorm and no dropout, so 2 processes equal one up to
float32 summation order (the tolerance of test_deepspeed.py). Ray cells join the session's head node."""

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
from engine.testing import free_port, ray_env, tiny_overrides, tofu_overrides
from tests.conftest import DIST_RUN, ray_submit

REPO = Path(__file__).resolve().parents[2]
TOL = 2e-5


def make_tiny_vit(out: Path, num_labels: int = 3) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=num_labels, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    return make_tiny_vit(tmp_path_factory.mktemp("vit") / "model")


def vision(cifar: Path, vit: Path, out: Path, **extra) -> list[str]:
    return tiny_overrides(cifar, out.parent, **{"output_dir": str(out), "model.path": str(vit),
                                                  "method.forget_batch_size": "6", "method.retain_batch_size": "16",
                                                  "eval.reference": "null", **extra})  # fmt: skip


def torchrun(config: str, args: list[str], command: str = "run") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env.pop("UNLEARN_FAULT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "engine.cli", command, config, *args]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def on_ray(config: str, args: list[str], head: dict, command: str = "run") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "engine.cli", command, config, *args, "backend.name=ray", "backend.num_workers=2",
           f"backend.ray_address={head['address']}", "backend.timeout_s=120"]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=1200)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check_equal(out: Path, single: Path, base: Path, stage: int) -> None:
    """``out`` (2 processes, ZeRO ``stage``) has the single process's weights, and the run really moved them."""
    assert max_diff(weights(single), load_file(base / "model.safetensors")) > 1e-3, (
        "the run must change the model"
    )
    assert max_diff(weights(out), weights(single)) < TOL
    report = json.loads((out / "report.json").read_text())
    assert report["backend"]["world_size"] == 2 and report["backend"]["zero_stage"] == stage
    assert report["metrics"].keys() == json.loads((single / "report.json").read_text())["metrics"].keys()


@pytest.fixture(scope="module")
def single(tiny_cifar, tiny_vit, tmp_path_factory):
    """``single(method, **overrides)``: the single-process image-classification run, once per module."""
    done: dict[tuple, Path] = {}

    def run(method: str, **extra) -> Path:
        key = (method, *sorted(extra.items()))
        if key not in done:
            out = tmp_path_factory.mktemp(f"single_{method}") / "out"
            assert (
                main(["run", "configs/demo.yaml", *vision(tiny_cifar, tiny_vit, out, method=method, **extra)])
                == 0
            )
            done[key] = out
        return done[key]

    return run


@pytest.mark.parametrize(
    "method, stage",
    [("scrub", 3), pytest.param("neggrad_plus", 2, marks=pytest.mark.full),
     pytest.param("npo", 2, marks=pytest.mark.full)],  # NPO and the paired stream serve images too
)  # fmt: skip
def test_image_classification_on_two_deepspeed_ranks(method, stage, single, tiny_cifar, tiny_vit, tmp_path):
    out = tmp_path / "ds"
    # NPO's language-model default (AdamW, lr 1e-5) barely moves a ViT; Adam's update of a near-zero gradient is
    # about lr * sign(g), so float noise in such gradients would decide its sign: SGD for an equality test
    extra = {"method.optimizer": "sgd", "method.lr": "0.05"} if method == "npo" else {}
    proc = torchrun("configs/demo.yaml", vision(tiny_cifar, tiny_vit, out, method=method, **extra,
                                                **{"backend.name": "deepspeed", "backend.zero_stage": str(stage)}))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_equal(out, single(method, **extra), tiny_vit, stage)


@pytest.mark.full
def test_image_classification_through_ray_submit_on_two_workers(
    single, tiny_cifar, tiny_vit, tmp_path, ray_head
):
    """`launchers/ray_submit.sh ADDRESS configs/demo.yaml` against the session's head node on 127.0.0.1."""
    out = tmp_path / "job"
    args = vision(tiny_cifar, tiny_vit, out, method="scrub",
                  **{"backend.num_workers": "2", "backend.zero_stage": "2", "backend.timeout_s": "120"})  # fmt: skip
    ray_submit(ray_head["dashboard"], "configs/demo.yaml", args)
    check_equal(out, single("scrub"), tiny_vit, 2)
    assert list((tmp_path / "job.ray" / "job").glob("checkpoint_*/deepspeed_checkpoint.txt"))


@pytest.mark.full
def test_image_classification_on_two_ray_train_workers(single, tiny_cifar, tiny_vit, tmp_path, ray_head):
    out = tmp_path / "ray"
    proc = on_ray("configs/demo.yaml", vision(tiny_cifar, tiny_vit, out, method="neggrad_plus",
                                              **{"backend.zero_stage": "3"}), ray_head)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    check_equal(out, single("neggrad_plus"), tiny_vit, 3)
    history = json.loads((out / "report.json").read_text())["history"]
    assert all(row["ray_report_seconds"] >= 0 for row in history[1:])  # each epoch was reported


@pytest.mark.full
@pytest.mark.parametrize(
    "method, backend, stage",
    [("grad_diff", "deepspeed", 3), ("npo", "ray", 2), ("simnpo", "deepspeed", 3), ("undial", "deepspeed", 3),
     ("idk_nll", "deepspeed", 3), ("idk_dpo", "deepspeed", 3), ("undial", "ray", 3), ("rmu", "ray", 2)],
)  # fmt: skip
def test_causal_lm_baselines_on_two_processes(
    method, backend, stage, tiny_lm, tofu_reference, tmp_path, ray_head
):
    # forget batches of 3 (each paired with 3 retain rows): 20 forget rows on 2 ranks, the last batch 2 rows;
    # method= first: a method.* override before the switch would be dropped
    run = {"method": method, "method.forget_batch_size": None, "method.batch_size": "3", "method.epochs": "2"}
    if method == "rmu":  # the tiny LM has 2 decoder layers; RMU's default (layer 7) is refused on it
        run["method.layer"] = "1"
    out = tmp_path / backend
    args = tofu_overrides(
        tiny_lm,
        tmp_path,
        output_dir=out,
        **{"method": method, **DIST_RUN, **run, "backend.zero_stage": str(stage)},
    )
    if backend == "ray":
        proc = on_ray("configs/tofu.yaml", args, ray_head)
    else:
        proc = torchrun("configs/tofu.yaml", [*args, "backend.name=deepspeed"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    check_equal(out, tofu_reference(**run), tiny_lm, stage)


@pytest.mark.full
def test_the_deepspeed_launcher_runs_the_demo_config_on_two_processes(single, tiny_cifar, tiny_vit, tmp_path):
    """`deepspeed --num_gpus 2 --module engine.cli run configs/demo.yaml` (on CPU: 2 processes) exports the model
    the single process does."""
    out = tmp_path / "ds"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "UNLEARN_FAULT")}  # fmt: skip
    env.update(OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(tmp_path / "no_hostfile"),
           "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--module", "engine.cli", "run", "configs/demo.yaml",
           *vision(tiny_cifar, tiny_vit, out, method="scrub", **{"backend.name": "deepspeed", "backend.zero_stage": "2"})]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, start_new_session=True
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    check_equal(out, single("scrub"), tiny_vit, 2)


def test_sync_batchnorm_on_cpu_is_refused_in_one_line_before_any_work(tiny_cifar, tiny_vit, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "engine.cli", "run", "configs/demo.yaml",
           *vision(tiny_cifar, tiny_vit, out, **{"backend.name": "deepspeed", "backend.sync_batchnorm": "true"})]  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "UNLEARN_FAULT")
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: backend.sync_batchnorm=true needs GPUs")
    assert not out.exists() and not out.with_name("out.partial").exists()


@pytest.mark.full
@pytest.mark.parametrize(
    "task, stage", [("image_classification", "2"), ("causal_lm", "2"), ("causal_lm", "3")]
)
def test_scrub_r_on_two_deepspeed_ranks_rewinds_as_the_single_process(
    task, stage, single, tofu_reference, tiny_cifar, tiny_vit, tiny_lm, tmp_path
):
    """SCRUB+R under ZeRO-2 and ZeRO-3: every epoch's checkpoint is kept until the run ends and the chosen one is
    read back on every rank (ZeRO-3: each its partition); the chosen epoch and both exported models are the
    single process's."""
    rewind = {"method.rewind": "true", "eval.every_epoch": "true"}
    out = tmp_path / "ds"
    ds = {"backend.name": "deepspeed", "backend.zero_stage": stage}
    if task == "image_classification":
        config, base, reference = "configs/demo.yaml", tiny_vit, single("scrub", **rewind)
        args = vision(tiny_cifar, tiny_vit, out, method="scrub", **rewind, **ds)
    else:
        config, base, reference = "configs/tofu.yaml", tiny_lm, tofu_reference(**rewind)
        args = tofu_overrides(tiny_lm, tmp_path, output_dir=out, **DIST_RUN, **rewind, **ds)
    proc = torchrun(config, args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    check_equal(out, reference, base, int(stage))
    rewound = [json.loads((run / "report.json").read_text())["rewound"] for run in (out, reference)]
    assert rewound[0]["epoch"] == rewound[1]["epoch"]
    a, b = (load_file(run / "model_rewound" / "model.safetensors") for run in (out, reference))
    assert max_diff(a, b) < TOL
    assert not (out / "epochs").exists() and not (out / "checkpoints").exists()  # scratch, removed


@pytest.mark.full
def test_image_classifier_training_on_two_deepspeed_ranks_equals_the_single_process(
    tiny_cifar, tiny_vit, tmp_path
):
    """`unlearn train` of image classifiers under DeepSpeed (the one train recipe of every task): the Original and
    Retrain fine-tuned from the tiny ViT on 2 ranks have one process's weights."""
    extra = {"model.arch": "null", "train.augment": "false", "train.epochs": "1", "train.batch_size": "16",
             "eval.every_epoch": "false"}  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "configs/demo.yaml", *vision(tiny_cifar, tiny_vit, one, **extra)]) == 0
    ds = {"backend.name": "deepspeed", "backend.zero_stage": "2"}
    proc = torchrun("configs/demo.yaml", vision(tiny_cifar, tiny_vit, two, **extra, **ds), command="train")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    base = load_file(tiny_vit / "model.safetensors")
    for target in ("original", "retrain"):
        a, b = (load_file(run / target / "model.safetensors") for run in (one, two))
        assert max_diff(a, base) > 1e-3 and max_diff(a, b) < TOL
        report = json.loads((two / target / "report.json").read_text())
        assert report["backend"]["world_size"] == 2 and report["task"] == "image_classification"


@pytest.mark.full
@pytest.mark.parametrize(
    "task, backend",
    [("image_classification", "deepspeed"), ("image_classification", "ray"), ("causal_lm", "deepspeed")],
)
def test_eval_on_two_processes_scores_as_the_single_process(
    task, backend, tiny_cifar, tiny_vit, tiny_lm, tmp_path, ray_head
):
    """`unlearn eval` (the one eval recipe) on 2 DeepSpeed ranks (ZeRO-3: collective forwards) and on 2 Ray Train
    workers: every rank scores, the main one writes, and the scores are the single process's."""

    def args(out: Path) -> list[str]:
        if task == "image_classification":
            return vision(tiny_cifar, tiny_vit, out)
        return tofu_overrides(tiny_lm, tmp_path, output_dir=out, **{"eval.reference": "null"})

    config = "configs/demo.yaml" if task == "image_classification" else "configs/tofu.yaml"
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["eval", config, *args(one)]) == 0
    if backend == "ray":
        proc = on_ray(config, [*args(two), "backend.zero_stage=3"], ray_head, command="eval")
    else:
        proc = torchrun(
            config, [*args(two), "backend.name=deepspeed", "backend.zero_stage=3"], command="eval"
        )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    a, b = (json.loads((run / "report.json").read_text()) for run in (one, two))
    assert b["backend"]["world_size"] == 2 and b["task"] == a["task"] == task
    assert a["metrics"].keys() == b["metrics"].keys()
    for key, value in a["metrics"].items():
        if isinstance(value, float):
            assert b["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
