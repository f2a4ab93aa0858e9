"""GradDiff (open-unlearning ``GradDiff``): in one step, ascend the forget NLL and descend the retain
NLL of as many retain examples drawn at random: loss = gamma * (-NLL_forget) + alpha * NLL_retain,
each a token mean over its own half of the batch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.methods.base import LossTerms, Phase
from engine.methods.grad_ascent import GradAscentConfig, split_paired, token_mean_nll


class GradDiffConfig(GradAscentConfig):
    name: Literal["grad_diff"] = Field("grad_diff", description="Method name.")
    gamma: float = Field(1.0, ge=0, description="Weight of the forget term (ascent).")
    alpha: float = Field(1.0, ge=0, description="Weight of the retain NLL term.")
    batch_size: int = Field(32, ge=1, description="Forget examples per step (each paired with a retain one).")


class GradDiff:
    needs_teacher = False

    def __init__(self, config: GradDiffConfig):
        self.config = config

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("paired", "paired", self.config.batch_size)]

    def loss(self, phase, student_logits, teacher_logits, labels, batch=None) -> LossTerms:
        c = self.config
        (f_logits, f_labels), (r_logits, r_labels) = split_paired(student_logits, labels, batch)
        total = -c.gamma * token_mean_nll(f_logits, f_labels) + c.alpha * token_mean_nll(r_logits, r_labels)
        return LossTerms(total=total, count=1)  # already a mean: two means over different token sets

    def penalty(self, student, teacher) -> None:
        return None
