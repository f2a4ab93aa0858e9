"""LoRA students end to end (`unlearn run` with model.lora): the teacher (the base weights, adapters disabled)
is bit-identical before and after while the student moves; the export is what model.lora.merge asks, and the
record, the card and the receipt say which; under ZeRO-2 on 2 gloo ranks the run equals the one-process run.

Tolerance of the 2-rank comparison as in test_deepspeed.py: both compute in float32, the 2 ranks sum their halves
of each batch and all-reduce the gradients (another summation order), so the merged weights agree to float32
rounding; a real fault (a wrong normaliser, a rank on the wrong rows, the base weights in the optimizer) moves
them by far more than 2e-5 (the adapters move the merged weights by about 0.1 here).
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
from engine.testing import free_port, tiny_overrides, tofu_overrides
from tests.conftest import DIST_RUN

REPO = Path(__file__).resolve().parents[2]
TOL = 2e-5
# the teacher is run, not cached, so its fingerprint is taken; scaling alpha/rank = 4 moves the tiny model well
LORA = {**DIST_RUN, "model.lora.rank": "4", "model.lora.alpha": "16", "method.teacher_cache": "off",
        "eval.every_epoch": "false", "tofu.utility_examples": "4"}  # fmt: skip


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def lora_single(tiny_lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "out"
    assert (
        main(["run", "configs/tofu.yaml", *tofu_overrides(tiny_lm, out.parent, output_dir=out, **LORA)]) == 0
    )
    return out


def test_a_lora_run_keeps_its_teacher_bit_identical_and_moves_the_student(lora_single, tiny_lm):
    from transformers import AutoModelForCausalLM

    teacher = report(lora_single)["teacher"]
    assert teacher is not None, "the LoRA teacher (adapters disabled) must be fingerprinted"
    assert teacher["unchanged"] is True and teacher["sha256_before"] == teacher["sha256_after"]
    exported, base = (
        load_file(lora_single / "model" / "model.safetensors"),
        load_file(tiny_lm / "model.safetensors"),
    )
    assert sorted(exported) == sorted(base)  # merged (the default): a plain checkpoint, the input's names
    adapted = [k for k in base if k.endswith("_proj.weight")]
    assert adapted and all(float((exported[k] - base[k]).abs().max()) > 1e-3 for k in adapted)  # it moved
    assert all(torch.equal(exported[k], base[k]) for k in base if k not in adapted)  # nothing else trained
    AutoModelForCausalLM.from_pretrained(lora_single / "model")  # the plain loader reads it
    readme = (lora_single / "model" / "README.md").read_text()
    assert "## LoRA student" in readme and "**merged**" in readme


def test_the_record_and_receipt_of_a_lora_run_say_which_export(lora_single):
    """Needs engine/recipes/unlearn.py to pass lora_summary(student, m.lora) to task.save and write_receipt."""
    record = json.loads((lora_single / "model" / "unlearning.json").read_text())["lora"]
    assert record["export"] == "merged" and record["target_modules"] == "all-linear" and record["rank"] == 4
    receipt = json.loads((lora_single / "receipt.json").read_text())
    assert receipt["lora"]["export"] == "merged" and receipt["lora"]["trainable_parameters"] > 0


def torchrun(overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env.pop("UNLEARN_FAULT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "engine.cli", "run", "configs/tofu.yaml", *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.full
@pytest.mark.parametrize("stage", ["2", "3"])
def test_lora_under_zero_on_two_ranks_equals_one_process(lora_single, tiny_lm, tmp_path, stage):
    """ZeRO-2: each rank holds the whole model, the adapters' optimizer state is sharded. ZeRO-3: the base weights
    are partitioned as they load and the adapters when DeepSpeed starts; the teacher's forwards gather the shards
    with the adapters disabled, and the merged export is formed from the gathered weights (measured 1e-7)."""
    out = tmp_path / f"zero{stage}"
    extra = {"backend.name": "deepspeed", "backend.zero_stage": stage}
    proc = torchrun(tofu_overrides(tiny_lm, tmp_path, output_dir=out, **LORA, **extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = load_file(lora_single / "model" / "model.safetensors")
    assert max_diff(single, load_file(tiny_lm / "model.safetensors")) > 1e-2  # the comparison means something
    assert max_diff(load_file(out / "model" / "model.safetensors"), single) < TOL
    a, b = report(out), report(lora_single)
    assert a["backend"]["world_size"] == 2 and a["backend"]["zero_stage"] == int(stage)
    for phase in ("max", "min"):
        assert len(a["losses"][phase]) == len(b["losses"][phase])
        assert a["losses"][phase] == pytest.approx(b["losses"][phase], rel=1e-4)
    teacher = a["teacher"]
    assert teacher["unchanged"] is True and len(teacher["sha256_before"]) == 2
    # ZeRO-2: the same whole base on each rank; ZeRO-3: each rank its own partition of it
    assert len(set(teacher["sha256_before"])) == (1 if stage == "2" else 2)


@pytest.mark.full
def test_an_image_classifier_lora_run_exports_its_adapter(tiny_cifar, tmp_path):
    """model.lora.merge=false on the CIFAR task: the adapter alone, loaded back over the input model with peft;
    the BatchNorm statistics the student moved travel with it, the teacher's stay the input's."""
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    from engine.models.vision import build_vision_model

    torch.manual_seed(0)
    build_vision_model("preact_resnet18", 3, width=0.125).save_pretrained(tmp_path / "base")
    extra = {"model.path": str(tmp_path / "base"), "forget.label": "airplane", "eval.reference": "null",
             "method.teacher_cache": "off", "model.lora.rank": "2", "model.lora.target_modules": "[conv1,conv2]",
             "model.lora.merge": "false"}  # fmt: skip
    assert main(["run", "configs/demo.yaml", *tiny_overrides(tiny_cifar, tmp_path, **extra)]) == 0
    out = tmp_path / "out"
    assert report(out)["teacher"]["unchanged"] is True
    model = out / "model"
    assert (model / "adapter_model.safetensors").is_file() and not (model / "model.safetensors").exists()
    config = json.loads((model / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = PeftModel.from_pretrained(
        AutoModelForImageClassification.from_pretrained(tmp_path / "base"), model
    )
    assert any("lora_B" in n and p.abs().max() > 0 for n, p in loaded.named_parameters())  # it trained
    assert json.loads((model / "unlearning.json").read_text())["lora"]["export"] == "adapter"
    receipt = json.loads((out / "receipt.json").read_text())
    assert (
        receipt["lora"]["export"] == "adapter"
        and "adapter_model.safetensors" in (receipt["output_models"]["model"]["weights_sha256"])
    )
    assert main(["verify", str(out / "receipt.json"), str(model)]) == 0  # the receipt names the adapter files
