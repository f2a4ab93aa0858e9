"""Finetune: ERM on D_r starting from the original (docs/algorithm.md: 10 epochs, SGD lr 0.01). Forgetting comes
only from catastrophic forgetting of what D_r does not contain."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.methods.base import OptimizerSettings
from engine.methods.erm import Erm


class FinetuneConfig(OptimizerSettings):
    """Defaults are the SCRUB paper's Finetune baseline."""

    name: Literal["finetune"] = Field("finetune", description="Method name.")
    epochs: int = Field(10, ge=1, description="Epochs over D_r.")
    lr: float = Field(0.01, gt=0, description="Initial learning rate.")
    lr_decay_epochs: list[int] = Field(
        default_factory=list, description="Epochs after which the lr decays (none by default)."
    )
    batch_size: int = Field(64, ge=1, description="Retain examples per step.")
    augment: bool = Field(False, description="Random crop (4-pixel padding) + horizontal flip.")


class Finetune(Erm):
    """Erm's one retain phase ("min") and cross-entropy, from the original's weights."""

    needs_teacher = False
