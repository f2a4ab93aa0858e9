"""GradDiff (open-unlearning ``GradDiff``): in one step, ascend the forget NLL and descend the retain
NLL of as many retain examples drawn at random: loss = gamma * (-NLL_forget) + alpha * NLL_retain,
each a token mean over its own half of the batch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.methods.base import LossTerms, Method, Phase
from engine.methods.grad_ascent import GradAscentConfig, split_paired
from engine.methods.losses import cross_entropy_sum


class GradDiffConfig(GradAscentConfig):
    name: Literal["grad_diff"] = Field("grad_diff", description="Method name.")
    gamma: float = Field(1.0, ge=0, description="Weight of the forget term (ascent).")
    alpha: float = Field(1.0, ge=0, description="Weight of the retain NLL term.")
    batch_size: int = Field(32, ge=1, description="Forget examples per step (each paired with a retain one).")


class GradDiff(Method):
    needs_teacher = False
    needs = ("paired",)

    def __init__(self, config: GradDiffConfig):
        self.config = config

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("paired", "paired", self.config.batch_size)]

    parts = ("forget", "retain")  # token means over the forget and over the retain answer tokens

    def part_counts(self, phase, batch: dict) -> tuple[int, int]:
        f = batch["forget_token"]
        return int(f.sum()), int((~f).sum())

    def loss(self, phase, student_logits, teacher_logits, labels, batch=None) -> LossTerms:
        c = self.config
        (f_logits, f_labels), (r_logits, r_labels) = split_paired(student_logits, labels, batch)
        forget = -c.gamma * cross_entropy_sum(f_logits, f_labels)
        retain = c.alpha * cross_entropy_sum(r_logits, r_labels)
        return LossTerms(total=forget + retain, count=int(labels.shape[0]), parts=(forget, retain))
