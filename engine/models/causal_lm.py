"""Causal language models: loading (``AutoModelForCausalLM``, safetensors only, remote code off unless
pinned), the tokenizer, and the loop's LM forward, which returns the logits of counted answer tokens
only: a [N, vocab] matrix whose rows are (token position, next-token target) pairs. With tokens as
rows, the classifier losses (SCRUB's divergence, cross-entropy) apply unchanged at token level."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from engine.errors import ConfigError, ModelError, first_line
from engine.models.loading import refuse_pickle_weights, safetensors_hint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_attn_implementation(attn_implementation: str) -> None:
    """Refuse flash_attention_2 where it cannot run, before any weight is read: transformers would fail
    only after resolving the checkpoint, with a message that does not name the engine's setting."""
    if attn_implementation != "flash_attention_2":
        return
    missing = []
    if importlib.util.find_spec("flash_attn") is None:
        missing.append("the flash_attn package is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA device is visible")
    if missing:
        raise ConfigError(
            f"model.attn_implementation=flash_attention_2 cannot run here ({' and '.join(missing)}): "
            "pip install flash-attn on a CUDA machine, or set model.attn_implementation=sdpa"
        )


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them. Non-reentrant
    checkpointing (torch's recommended form): the reentrant one computes no parameter gradients for a
    layer none of whose inputs requires grad, and does not support every autograd feature."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(
            f"{type(model).__name__} does not support gradient checkpointing: set model.gradient_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    # transformers 5.x renamed it activation_checkpointing_enable and deprecated the old name (FutureWarning);
    # the old name is kept for the 5.x releases before the rename (pyproject: transformers>=5.0)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_causal_lm(
    path: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
):
    """The causal LM at ``path`` (a folder or a hub id at ``revision``), safetensors only, with the attention
    kernel ``attn_implementation`` (sdpa, eager or flash_attention_2) and, when asked, gradient checkpointing
    (used only in train mode: a frozen teacher in eval mode runs its forward as usual)."""
    from transformers import AutoModelForCausalLM

    if trust_remote_code and not revision:
        raise ModelError(
            "model.trust_remote_code=true runs the checkpoint's own Python code: pin it with model.revision=<commit>"
        )
    check_attn_implementation(attn_implementation)
    refuse_pickle_weights(path, "AutoModelForCausalLM")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            dtype=DTYPES[dtype],
            attn_implementation=attn_implementation,
        )
    except OSError as exc:
        hint = "" if Path(path).exists() else " (it is not a local folder; hub ids need a network)"
        gguf = list(Path(path).glob("*.gguf")) if Path(path).is_dir() else []
        if gguf:
            hint = f" (it holds a GGUF file: convert it first with `unlearn convert-gguf {gguf[0]} OUT_DIR`)"
        else:
            hint += safetensors_hint(exc)
        raise ModelError(f"cannot load a causal LM from {path!r}{hint}: {exc}") from exc
    except ValueError as exc:
        if "attn_implementation" in str(exc) or "scaled_dot_product_attention" in str(exc):
            # an architecture without that kernel (some remote-code models have no sdpa path)
            raise ModelError(
                f"{path!r} cannot use model.attn_implementation={attn_implementation} ({first_line(exc)}): "
                "set model.attn_implementation=eager (every architecture has it)"
            ) from exc
        raise ModelError(f"{path!r} is not a causal-LM checkpoint: {exc}") from exc
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The checkpoint's tokenizer; a missing pad token becomes the end-of-sequence token (padding is
    masked everywhere, so its id never matters)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path!r}: {exc}") from exc
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(f"the tokenizer of {path!r} has neither a pad nor an end-of-sequence token")
        tok.pad_token = tok.eos_token
    return tok


def check_vocab(model, tokenizer, path: str) -> None:
    """Refuse a tokenizer whose ids the model's embedding cannot hold."""
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3: the local tensor is a partition
    if len(tokenizer) > rows:
        raise ModelError(
            f"the tokenizer of {path!r} has {len(tokenizer)} tokens but the model's embedding has {rows} rows, so "
            f"token ids >= {rows} cannot be embedded: use the tokenizer saved with this checkpoint (its "
            "tokenizer.json beside config.json), or, if the tokenizer added tokens on purpose, call "
            "model.resize_token_embeddings(len(tokenizer)) and save the model with save_pretrained first"
        )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded row computes what a right-padded one does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logits(model, batch: dict) -> torch.Tensor:
    """The loop's forward for causal LMs: logits at the counted positions, [N, vocab], in the same
    row-major order as ``batch["labels"]`` (see ``engine.data.text.collate``): the logits at position
    t predict token t + 1, and only positions whose next token is an answer token are kept."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids(batch["attention_mask"]),
        use_cache=False,
    )
    counted = batch["token_labels"][:, 1:] != -100
    return out.logits[:, :-1][counted]


def set_dropout(model, p: float) -> int:
    """Set every dropout of ``model`` to ``p``: ``nn.Dropout`` modules and the float rates attention
    layers keep as attributes (Llama's ``attention_dropout``). Returns how many were set, so a model
    without any dropout site is reported rather than silently left deterministic."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p, count = p, count + 1
        for name in ("attention_dropout", "dropout_p"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, p)
                count += 1
    if hasattr(getattr(model, "config", None), "attention_dropout"):
        model.config.attention_dropout = p
    if count == 0:
        raise ConfigError(f"{type(model).__name__} has no dropout to set: unset method.student_dropout")
    return count
