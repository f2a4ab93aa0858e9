"""GradAscent (open-unlearning ``GradAscent``): ascend the next-token NLL of the forget set. The
simplest language-model baseline; it has no term that holds utility, so it usually collapses."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from engine.methods.base import LossTerms, Method, OptimizerSettings, Phase
from engine.methods.losses import cross_entropy_sum


class GradAscentConfig(OptimizerSettings):
    """Defaults follow open-unlearning's TOFU runs: AdamW, lr 1e-5, weight decay 0.01, 10 epochs, batch 32."""

    name: Literal["grad_ascent"] = Field("grad_ascent", description="Method name.")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-5, gt=0, description="Learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="Weight decay.")
    lr_decay_epochs: list[int] = Field(default_factory=list, description="Epochs after which the lr decays.")
    epochs: int = Field(10, ge=1, description="Passes over the forget set.")
    batch_size: int = Field(32, ge=1, description="Forget examples per step.")


class GradAscent(Method):
    needs_teacher = False
    needs = ()

    def __init__(self, config: GradAscentConfig):
        self.config = config

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("forget", "forget", self.config.batch_size)]

    def loss(self, phase, student_logits, teacher_logits, labels, batch=None) -> LossTerms:
        # -(token-mean NLL), as open-unlearning's -outputs.loss: the sum over tokens over the token count.
        return LossTerms(total=-cross_entropy_sum(student_logits, labels), count=int(labels.shape[0]))


def split_paired(student_logits: torch.Tensor, labels: torch.Tensor, batch: dict):
    """The forget and the retain items (text: answer tokens; images: rows) of a paired batch
    (engine/data/paired.py)."""
    if batch is None or "forget_token" not in batch:
        raise ValueError(
            "this method needs batches from a PairedStream (forget rows paired with retain rows)"
        )
    f = batch["forget_token"]
    return (student_logits[f], labels[f]), (student_logits[~f], labels[~f])
