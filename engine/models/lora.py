"""LoRA students through peft (``model.lora``): only the adapters train, and the teacher is the same base
weights with the adapters disabled (TRL's ``disable_adapter()`` reference), so one copy of the model is in
memory and the teacher cannot drift: its weights are never in the optimizer.
"""

from __future__ import annotations

import torch


def apply_lora(model: torch.nn.Module, settings) -> torch.nn.Module:
    """``model`` with LoRA adapters (``settings``: engine.config.LoraSettings) on its target modules; the base
    weights frozen, the adapters trainable. A causal LM becomes a ``PeftModel``; any other module (an image
    classifier) too, through peft's custom-model support."""
    from peft import LoraConfig, get_peft_model

    from engine.errors import ConfigError

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # no module matched, or all-linear on a model that is not a transformers one
        raise ConfigError(f"model.lora.target_modules={settings.target_modules!r}: {exc}") from None


class AdapterDisabled(torch.nn.Module):
    """The teacher of a LoRA student: calls the student's base model with its adapters disabled and in eval
    mode (no dropout), under no_grad by the loop. It holds no module of its own (the student is kept out of
    ``_modules``), so moving, freezing or saving it never touches the student; ``parameters()`` are the base
    weights (the teacher's fingerprint)."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "student", student)  # not a submodule: see the class docstring

    def forward(self, *args, **kwargs):
        was_training = self.student.training
        self.student.eval()
        try:
            with self.student.disable_adapter():
                return self.student(*args, **kwargs)
        finally:
            self.student.train(was_training)

    def parameters(self, recurse: bool = True):
        return (p for n, p in self.student.named_parameters() if "lora_" not in n)

    def named_parameters(self, *args, **kwargs):
        return ((n, p) for n, p in self.student.named_parameters() if "lora_" not in n)
