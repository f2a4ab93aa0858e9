"""Plain supervised training (empirical risk minimisation) on the retain stream.

It trains the Original (retain stream = the whole train split) and the Retrain reference (retain
stream = D_r) with one recipe, and is the Finetune baseline when started from the original.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from engine.methods.base import LossTerms, Method, OptimizerSettings, Phase
from engine.methods.losses import cross_entropy_sum


class ErmConfig(OptimizerSettings):
    name: Literal["erm"] = Field("erm", description="Method name.")
    epochs: int = Field(16, ge=1, description="Training epochs.")
    lr: float = Field(0.05, gt=0, description="Initial learning rate.")
    lr_decay_epochs: list[int] = Field(
        default_factory=lambda: [8, 12], description="Epochs after which the lr decays."
    )
    batch_size: int = Field(64, ge=1, description="Batch size.")
    augment: bool = Field(True, description="Random crop (4-pixel padding) + horizontal flip.")


class Erm(Method):
    needs_teacher = False
    needs = ()

    def __init__(self, config: ErmConfig):
        self.config = config

    @property
    def augment(self) -> bool:
        return self.config.augment

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("min", "retain", self.config.batch_size)]

    def loss(
        self,
        phase: str,
        student_logits: torch.Tensor,
        teacher_logits,
        labels: torch.Tensor,
        batch: dict | None = None,
    ) -> LossTerms:
        return LossTerms(total=cross_entropy_sum(student_logits, labels), count=int(labels.shape[0]))
