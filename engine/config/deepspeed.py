"""The DeepSpeed JSON a run takes: ``backend.deepspeed_config`` with the run config's choices applied on top, and
refused in one line when it cannot serve (a missing file, an optimizer section, an offload its stage lacks). Read
by the rules before any work (engine/config/rules.py: the ZeRO stage) and by the DeepSpeed backend."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.errors import ConfigError


def build_ds_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON of ``cfg.deepspeed_config`` with the run config's choices applied on top."""
    path = Path(cfg.deepspeed_config)
    if not path.is_file():
        raise ConfigError(
            f"backend.deepspeed_config {str(path)!r} does not exist (the shipped ones are configs/deepspeed/*.json)"
        )
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"{path} has a {section!r} section: the optimizer and its per-epoch learning rate come from the "
                "method's settings (method.optimizer, method.lr, ...); remove that section"
            )
    zero = ds.setdefault("zero_optimization", {})
    if cfg.zero_stage is not None:
        zero["stage"] = cfg.zero_stage
    stage = zero.setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.dtype == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.dtype == "fp16"}
    # The loop, not DeepSpeed, cuts the configured global batch into micro-batches (base.py); these
    # numbers only tell DeepSpeed where the accumulation boundary is.
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["train_batch_size"] = cfg.gradient_accumulation_steps * world_size
    ds.setdefault("gradient_clipping", 0.0)  # SCRUB has no clipping (docs/algorithm.md)
    ds["zero_allow_untested_optimizer"] = True  # the method's torch optimizer
    ds.setdefault("steps_per_print", 10**9)
    for kind in ("optimizer", "param"):
        device = getattr(cfg, f"offload_{kind}")
        if device == "none":
            continue
        if kind == "optimizer" and stage == 0 or kind == "param" and stage != 3:
            need = "1, 2 or 3" if kind == "optimizer" else "3"
            raise ConfigError(f"backend.offload_{kind}={device} needs ZeRO stage {need} (got {stage})")
        if device == "nvme" and not cfg.nvme_path:
            raise ConfigError(
                f"backend.offload_{kind}=nvme needs backend.nvme_path (a fast local disk folder)"
            )
        zero[f"offload_{kind}"] = {
            "device": device,
            **({"nvme_path": cfg.nvme_path} if device == "nvme" else {}),
            "pin_memory": torch.cuda.is_available(),
        }
    if stage == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return ds
