"""LoRA students (engine/models/lora.py) and their export (engine/artifacts/export.py): only the adapters train,
the teacher (adapters disabled) is exactly the base model, and both exports load back as the live student."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.artifacts.export import image_processor, model_card, save_checkpoint
from engine.errors import ConfigError
from engine.models.lora import (
    AdapterDisabled,
    LoraSettings,
    apply_lora,
    is_lora,
    lora_summary,
    merged_state_dict,
)

TOKENS = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 7], [12, 4, 250, 33, 9, 71, 2, 18]])


def load_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero adapters (peft starts lora_B at zero, where the student still equals its base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model: torch.nn.Module, **batch) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(**batch).logits
    model.train(was)
    return out


def card() -> object:
    return model_card(
        "test",
        None,
        {"name": "scrub"},
        {},
        model_name="m",
        task_type="text-generation",
        tags=["machine-unlearning"],
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


def test_only_the_adapters_train_and_the_summary_counts_them(tiny_lm):
    student = apply_lora(load_lm(tiny_lm), LoraSettings(rank=4, alpha=8))
    assert is_lora(student) and type(student).__name__ == "PeftModelForCausalLM"
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)  # all-linear leaves the head out
    s = lora_summary(student, LoraSettings(rank=4, alpha=8, merge=False))
    assert (
        s["rank"] == 4
        and s["alpha"] == 8
        and s["export"] == "adapter"
        and s["target_modules"] == "all-linear"
    )
    assert s["trainable_parameters"] == sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert s["total_parameters"] == sum(p.numel() for p in student.parameters())
    assert s["adapted_modules"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert s["base_model"] == str(tiny_lm)


def test_the_teacher_is_exactly_the_base_model_after_the_adapters_trained(tiny_lm):
    base = load_lm(tiny_lm).eval()
    student = apply_lora(load_lm(tiny_lm), LoraSettings(rank=4, dropout=0.1))
    teacher = AdapterDisabled(student)
    student.train()
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):  # real steps: the adapters move, the base weights must not
        loss = student(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        taught = teacher(input_ids=TOKENS).logits
    assert student.training, "the teacher's forward must leave the student in train mode"
    assert torch.equal(taught, logits(base, input_ids=TOKENS))  # bit-identical, not close
    assert not torch.allclose(logits(student, input_ids=TOKENS), taught, atol=1e-4)  # the student did move
    pairs = list(
        zip(teacher.parameters(), base.parameters(), strict=True)
    )  # the fingerprint: base weights only
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not list(teacher.children())  # moving or saving the teacher never touches the student


def test_the_teacher_restores_each_modules_own_mode(tiny_lm):
    student = apply_lora(load_lm(tiny_lm), LoraSettings(rank=2))
    student.train()
    frozen = student.get_base_model().model.layers[0]
    frozen.eval()  # a method may hold part of the student in eval mode
    with torch.no_grad():
        AdapterDisabled(student)(input_ids=TOKENS)
    assert student.training and not frozen.training


def test_merged_export_is_a_plain_checkpoint_with_the_students_logits(tiny_lm, tokenizer, tmp_path):
    student = apply_lora(load_lm(tiny_lm), LoraSettings(rank=4))
    perturb(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    expected = logits(student, input_ids=TOKENS)
    save_checkpoint(student, tmp_path / "model", tokenizer, card(), {"metrics": {}})

    out = tmp_path / "model"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert sorted(load_file(out / "model.safetensors")) == sorted(load_file(tiny_lm / "model.safetensors"))
    assert torch.allclose(logits(load_lm(out), input_ids=TOKENS), expected, atol=1e-5)
    # the live student is untouched: training or evaluating it after the export (SCRUB+R) sees the same model
    assert is_lora(student)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert torch.equal(logits(student, input_ids=TOKENS), expected)
    record = json.loads((out / "unlearning.json").read_text())
    assert record["lora"]["export"] == "merged" and record["lora"]["rank"] == 4
    readme = (out / "README.md").read_text()
    assert "## LoRA student" in readme and "**merged**" in readme and "- lora" in readme


def test_adapter_export_loads_over_the_base_with_peft(tiny_lm, tokenizer, tmp_path):
    from peft import PeftModel

    student = apply_lora(load_lm(tiny_lm), LoraSettings(rank=4, merge=False))
    perturb(student)
    record = {"metrics": {}, "lora": lora_summary(student, LoraSettings(rank=4, merge=False))}
    save_checkpoint(student, tmp_path / "adapter", tokenizer, card(), record)

    out = tmp_path / "adapter"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert all("lora_" in k for k in load_file(out / "adapter_model.safetensors"))  # the adapter alone
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_lm) and config["r"] == 4
    loaded = PeftModel.from_pretrained(load_lm(tiny_lm), out)
    assert torch.allclose(logits(loaded, input_ids=TOKENS), logits(student, input_ids=TOKENS), atol=1e-6)
    assert json.loads((out / "unlearning.json").read_text())["lora"]["export"] == "adapter"
    readme = (out / "README.md").read_text()
    assert (
        "library_name: peft" in readme and "**adapter**" in readme and "PeftModel.from_pretrained" in readme
    )
    assert "AutoModelForCausalLM" in readme


def test_the_export_writes_the_given_weights_not_the_modules(tiny_lm, tokenizer, tmp_path):
    """Under ZeRO-3 the module holds a partition and the gathered weights come as ``state_dict``."""
    student = apply_lora(load_lm(tiny_lm), LoraSettings(rank=4))
    perturb(student, seed=0)
    other = copy.deepcopy(student)
    perturb(other, seed=1)
    save_checkpoint(student, tmp_path / "model", tokenizer, "card", {}, state_dict=other.state_dict())
    assert torch.allclose(logits(load_lm(tmp_path / "model"), input_ids=TOKENS), logits(other, input_ids=TOKENS),
                          atol=1e-5)  # fmt: skip
    assert "## LoRA student" in (tmp_path / "model" / "README.md").read_text()  # a plain-text card too


def test_a_bfloat16_merge_is_formed_in_float32_and_keeps_the_dtype(tiny_lm):
    student = apply_lora(load_lm(tiny_lm), LoraSettings(rank=4))
    perturb(student)
    half = {k: v.to(torch.bfloat16) for k, v in student.state_dict().items()}
    merged = merged_state_dict(student, half)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    layer = student.get_submodule(name)
    a, b = half[f"{name}.lora_A.default.weight"].float(), half[f"{name}.lora_B.default.weight"].float()
    expected = (half[f"{name}.base_layer.weight"].float() + b @ a * layer.scaling["default"]).to(
        torch.bfloat16
    )
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], expected)


def vision_model():
    from engine.models.vision import build_vision_model

    torch.manual_seed(0)
    return build_vision_model("preact_resnet18", 3, width=0.125)


def test_an_image_classifier_gets_adapters_and_keeps_its_teachers_batchnorm(tmp_path):
    from transformers import AutoModelForImageClassification

    base = vision_model().eval()
    student = apply_lora(
        copy.deepcopy(base), LoraSettings(rank=2, target_modules=["conv1", "conv2", "linear"])
    )
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    images = torch.randn(4, 3, 32, 32)
    student.train()
    with torch.no_grad():
        student(pixel_values=images * 3 + 1)  # train mode: the student's BatchNorm statistics move
    perturb(student)
    teacher = AdapterDisabled(student)
    with torch.no_grad():
        assert torch.equal(teacher(pixel_values=images).logits, base(pixel_values=images).logits)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), base.parameters(), strict=True))

    processor = image_processor({"mean": [0.5] * 3, "std": [0.25] * 3})
    save_checkpoint(student, tmp_path / "model", processor, "card", {"metrics": {}})
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "model")
    expected = logits(student, pixel_values=images)
    assert not torch.allclose(expected, logits(base, pixel_values=images), atol=1e-4)
    assert torch.allclose(logits(loaded, pixel_values=images), expected, atol=1e-5)


def test_an_image_classifier_adapter_export_loads_over_the_base(tmp_path):
    from peft import PeftModel

    base = vision_model()
    base.save_pretrained(tmp_path / "base")
    student = apply_lora(copy.deepcopy(base), LoraSettings(rank=2, target_modules=["conv2"], merge=False))
    perturb(student)
    processor = image_processor({"mean": [0.5] * 3, "std": [0.25] * 3})
    save_checkpoint(student, tmp_path / "adapter", processor, "card", {"lora": {"export": "adapter"}})
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(
        logits(loaded, pixel_values=images), logits(student, pixel_values=images), atol=1e-6
    )
    assert "AutoModelForImageClassification" in (tmp_path / "adapter" / "README.md").read_text()


@pytest.mark.parametrize(
    ("targets", "words"),
    [
        ("all-linear", ["all-linear is for language models", "conv1", "linear"]),
        (["fc9"], ["no module of PreActResNetForImageClassification is named 'fc9'", "conv2"]),
        (["bn1"], ["'bn1' names BatchNorm2d modules, which LoRA cannot adapt"]),
    ],
)
def test_image_classifier_targets_that_cannot_work_are_refused_in_one_line(targets, words):
    with pytest.raises(ConfigError) as err:
        apply_lora(vision_model(), LoraSettings(target_modules=targets))
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words)


def test_an_adapter_on_a_tied_weight_is_refused(tiny_lm):
    with pytest.raises(ConfigError, match="tied to another module's .*leave it out"):
        apply_lora(load_lm(tiny_lm), LoraSettings(target_modules=["q_proj", "lm_head"]))


def test_the_receipt_says_which_export(tmp_path):
    from engine.artifacts.receipt import write_receipt

    (tmp_path / "config.yaml").write_text("seed: 0\n")
    args = dict(forget={"kind": "class"}, input_model=str(tmp_path), revision=None, outputs={}, method={},
                metrics={}, started_at="now")  # fmt: skip
    lora = {"rank": 4, "export": "adapter"}
    receipt = write_receipt(tmp_path, **args, lora=lora)
    assert receipt["lora"] == lora and receipt["versions"]["peft"]
    assert json.loads((tmp_path / "receipt.json").read_text())["lora"] == lora
    plain = write_receipt(tmp_path, **args)
    assert "lora" not in plain and "peft" not in plain["versions"]
