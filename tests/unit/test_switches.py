"""The large-model switches, each a config field: gradient checkpointing (model.gradient_checkpointing), the
attention kernel (model.attn_implementation) and autocast on the single-process backend (backend.dtype). Each
is checked for what it does, on a tiny Llama built from a config: same numbers as without, and really on."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.backends import SingleProcessBackend, build_backend
from engine.config import load_config
from engine.errors import ConfigError, ModelError
from engine.models.causal_lm import load_causal_lm, set_dropout, token_logits
from engine.tasks.causal_lm import CausalLM
from engine.testing import build_tiny_llama

VOCAB = 64


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved with save_pretrained (no tokenizer: load_causal_lm reads weights only)."""
    out = tmp_path_factory.mktemp("switches_llama")
    build_tiny_llama(VOCAB, seed=3).save_pretrained(out)
    return out


def lm_batch(seed: int = 0, rows: int = 3, length: int = 12) -> dict:
    """A left-padded batch in the collate's layout: every real token after a row's first is counted (the
    logits at a pad position are never kept: the kernels differ there, on rows that attend to nothing)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[1, :4] = 0  # left padding: position ids and masks must agree between the kernels
    attention_mask[2, :7] = 0
    first = attention_mask.argmax(-1)
    token_labels = input_ids.masked_fill(attention_mask == 0, -100)
    token_labels[torch.arange(rows), first] = -100  # a row's first token is a prompt, not a target
    counted = token_labels[:, 1:] != -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_labels": token_labels,
            "labels": input_ids[:, 1:][counted]}  # fmt: skip


def checkpointing_on(model) -> bool:
    # transformers 5.x renamed the property (the old name warns); either says whether any layer checkpoints
    name = (
        "is_activation_checkpointing"
        if hasattr(model, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(model, name))


def loss_and_grads(model, batch: dict, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both models
    loss = torch.nn.functional.cross_entropy(token_logits(model, batch), batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# --- gradient checkpointing ------------------------------------------------------------------------------------


def test_gradient_checkpointing_same_loss_and_gradients_and_recomputes(llama_dir):
    plain = load_causal_lm(str(llama_dir))
    checkpointed = load_causal_lm(str(llama_dir), gradient_checkpointing=True)
    assert checkpointing_on(checkpointed) and not checkpointing_on(plain)
    # dropout on: the recomputed forward must replay the same masks (torch restores the RNG state)
    for model in (plain, checkpointed):
        set_dropout(model, 0.2)
        model.train()

    # really on: a checkpointed layer runs its forward again in backward, a plain one does not. Counted by a
    # PRE-hook: torch stops the replay as soon as the saved tensors are rebuilt, before the last module returns
    calls = {"plain": 0, "checkpointed": 0}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        count = lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)  # noqa: E731
        model.model.layers[0].mlp.register_forward_pre_hook(count)

    batch = lm_batch()
    loss_a, grads_a = loss_and_grads(plain, batch, seed=7)
    loss_b, grads_b = loss_and_grads(checkpointed, batch, seed=7)
    assert calls == {"plain": 1, "checkpointed": 2}
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in grads_b.values())

    # a frozen copy in eval mode (a teacher, an evaluation) runs no recompute and the same logits
    checkpointed.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(token_logits(checkpointed, batch), token_logits(plain, batch))
    assert calls == {"plain": 2, "checkpointed": 3}


def test_gradient_checkpointing_refused_where_the_architecture_has_none(llama_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    with pytest.raises(ModelError, match="set model.gradient_checkpointing=false"):
        load_causal_lm(str(llama_dir), gradient_checkpointing=True)


# --- attention implementation ----------------------------------------------------------------------------------


def test_eager_and_sdpa_give_the_same_logits(llama_dir):
    batch = lm_batch(seed=1)
    logits = {}
    for kernel in ("eager", "sdpa"):
        model = load_causal_lm(str(llama_dir), attn_implementation=kernel).eval()
        assert model.config._attn_implementation == kernel
        with torch.no_grad():
            logits[kernel] = token_logits(model, batch)
    assert logits["eager"].shape == (int((batch["token_labels"][:, 1:] != -100).sum()), VOCAB)
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-5)


def test_flash_attention_2_refused_in_one_line_before_loading(tmp_path):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        pytest.skip("flash-attn and CUDA are here: flash_attention_2 can run")
    missing = tmp_path / "no_model_here"  # refused before any file is read: not a "cannot load" ModelError
    with pytest.raises(ConfigError) as err:
        load_causal_lm(str(missing), attn_implementation="flash_attention_2")
    message = str(err.value)
    assert "\n" not in message
    assert "model.attn_implementation=flash_attention_2" in message
    assert "pip install flash-attn" in message and "model.attn_implementation=sdpa" in message


def test_a_kernel_the_architecture_lacks_is_refused_with_what_to_set(llama_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_supports_sdpa", False)  # as some remote-code models
    with pytest.raises(ModelError) as err:
        load_causal_lm(str(llama_dir), attn_implementation="sdpa")
    assert "\n" not in str(err.value) and "set model.attn_implementation=eager" in str(err.value)
    assert load_causal_lm(str(llama_dir), attn_implementation="eager").config._attn_implementation == "eager"


def test_the_task_loads_with_the_configured_switches(llama_dir):
    """CausalLM.load hands model.attn_implementation and model.gradient_checkpointing to the loader."""
    overrides = ["task=causal_lm", "data.preset=tofu", "model.attn_implementation=eager",
                 "model.gradient_checkpointing=true"]  # fmt: skip
    task = SimpleNamespace(cfg=load_config(None, overrides))  # load reads only the config
    model = CausalLM.load(task, str(llama_dir))
    assert model.config._attn_implementation == "eager"
    assert checkpointing_on(model)

    task = SimpleNamespace(cfg=load_config(None, overrides[:2]))  # the defaults: sdpa, no checkpointing
    model = CausalLM.load(task, str(llama_dir))
    assert model.config._attn_implementation == "sdpa" and not checkpointing_on(model)

    if not torch.cuda.is_available():
        task = SimpleNamespace(
            cfg=load_config(None, [*overrides[:2], "model.attn_implementation=flash_attention_2"])
        )
        with pytest.raises(ConfigError, match="flash-attn"):
            CausalLM.load(task, "someone/not-resolved")  # refused before the hub id is resolved


# --- autocast on the single-process backend --------------------------------------------------------------------


def one_step(backend: SingleProcessBackend, model: torch.nn.Module, batch: dict) -> tuple[torch.dtype, dict]:
    """The loop's step on ``backend``: forward under its autocast, loss in fp32, backward, SGD step. Returns the
    logits' dtype and how far each weight moved."""
    student, _ = backend.prepare(model, None, lambda params: torch.optim.SGD(params, lr=0.5))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    student.train()
    with backend.autocast():
        logits = token_logits(student, batch)
    loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
    backend.backward(loss)
    backend.step()
    for p in student.parameters():
        assert p.dtype == torch.float32  # the weights (and so the optimizer's state) stay fp32
        assert p.grad is None  # the step cleared them
    return logits.dtype, {n: p.detach() - before[n] for n, p in student.named_parameters()}


def test_bf16_autocast_on_the_single_backend_steps_like_fp32(llama_dir):
    model = load_causal_lm(str(llama_dir))
    batch = lm_batch(seed=2)
    dtype16, moved16 = one_step(SingleProcessBackend("cpu", dtype="bf16"), copy.deepcopy(model), batch)
    dtype32, moved32 = one_step(SingleProcessBackend("cpu", dtype="fp32"), copy.deepcopy(model), batch)
    assert dtype16 == torch.bfloat16 and dtype32 == torch.float32
    flat16 = torch.cat([v.flatten() for v in moved16.values()])
    flat32 = torch.cat([v.flatten() for v in moved32.values()])
    # both moved, and autocast did change the numbers
    assert flat32.norm() > 0 and not torch.equal(flat16, flat32)
    # bf16 keeps ~3 significant digits: the step is the fp32 one to a few percent
    assert (flat16 - flat32).norm() / flat32.norm() < 0.05
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.999


def test_backend_dtype_reaches_the_single_backend():
    for dtype, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        backend = build_backend(load_config(None, ["backend.device=cpu", f"backend.dtype={dtype}"]).backend)
        assert backend.dtype == dtype and backend.scaler is None  # a loss scaler only for fp16 on CUDA
        layer = torch.nn.Linear(4, 4)
        with backend.autocast():
            out = layer(torch.randn(2, 4))
        assert out.dtype == expected and layer.weight.dtype == torch.float32
    with pytest.raises(ConfigError, match="backend.dtype"):
        SingleProcessBackend("cpu", dtype="fp8")


def test_fp16_loss_scaling_skips_overflowing_steps_and_resumes(tmp_path):
    """fp16 on CUDA steps through a GradScaler. No GPU here: the same wiring is driven with torch's CPU scaler
    (the scaler, not the device, decides what backward and step do)."""
    backend = SingleProcessBackend("cpu", dtype="fp16")
    backend.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.manual_seed(0)
    model, _ = backend.prepare(torch.nn.Linear(4, 1), None, lambda params: torch.optim.SGD(params, lr=0.1))
    x = torch.randn(8, 4)

    reference = copy.deepcopy(model)  # the plain fp32 step, for comparison
    reference(x).square().mean().backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()

    backend.backward(model(x).square().mean())
    torch.testing.assert_close(model.weight.grad, 1024.0 * reference.weight.grad)  # scaled in backward
    backend.step()
    # ... and unscaled before the step: the ordinary SGD step
    torch.testing.assert_close(model.weight.detach(), reference.weight.detach())
    torch.testing.assert_close(model.bias.detach(), reference.bias.detach())

    # an overflowing gradient: the step is skipped (weights unchanged) and the scale halved
    kept = model.weight.detach().clone()
    backend.backward(model(x).square().mean() * float("inf"))
    backend.step()
    assert torch.equal(model.weight.detach(), kept) and model.weight.grad is None
    assert backend.scaler.get_scale() == 512.0

    # the scale travels with the optimizer state through a checkpoint
    backend.save_checkpoint(tmp_path, "step", model, {})
    resumed = SingleProcessBackend("cpu", dtype="fp16")
    resumed.scaler = torch.amp.GradScaler("cpu")
    resumed.prepare(torch.nn.Linear(4, 1), None, lambda params: torch.optim.SGD(params, lr=0.1))
    resumed.load_checkpoint(tmp_path, "step", model)
    assert resumed.scaler.get_scale() == 512.0
