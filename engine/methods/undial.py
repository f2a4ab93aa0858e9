"""UNDIAL (Dong et al. 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large
Language Models"; open-unlearning ``UNDIAL``): distil the frozen original into the student on the forget answers,
the original's logit of each answer token lowered by beta first, so the student keeps the original's distribution
but for the memorised token: loss = gamma * mean_tok[CE(student, softmax(teacher - beta * onehot(y)))] +
alpha * NLL_retain (open-unlearning's ``compute_undial_loss`` and src/trainer/unlearn/undial.py).

open-unlearning distils every position of the forget sequences, prompt and padding included (there its -100
labels lower the logit of vocabulary id V - 100); here only the answer tokens, the ones whose label is the
memorised token, as the paper describes. With alpha = 0 (the default, the paper's: no retain set) the retain half
would be multiplied by zero, so the run reads the forget stream alone: half the forwards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.methods.base import LossTerms, Method, Phase
from engine.methods.grad_diff import GradDiffConfig
from engine.methods.losses import cross_entropy_sum, undial_sum


class UndialConfig(GradDiffConfig):
    """beta 10, gamma 1, alpha 0, lr 1e-4, 10 epochs: open-unlearning's configs/trainer/UNDIAL.yaml (lr 1e-4 is
    also the paper's, with LoRA; community/methods/UNDIAL suggests searching lr over 1e-5..3e-4 and beta over
    3, 10, 30). AdamW, weight decay 0.01, batch 32 as every language-model baseline here."""

    name: Literal["undial"] = Field("undial", description="Method name.")
    lr: float = Field(1e-4, gt=0, description="Learning rate.")
    beta: float = Field(
        10.0, ge=0, description="How far the teacher's logit of each forget answer token is lowered."
    )
    gamma: float = Field(1.0, ge=0, description="Weight of the forget (self-distillation) term.")
    alpha: float = Field(
        0.0, ge=0, description="Weight of the retain NLL term (0: the forget stream alone, as the paper)."
    )


class Undial(Method):
    needs_teacher = True  # the frozen original, whose adjusted logits are the target (a LoRA student's base)
    needs = ("teacher", "paired")

    def __init__(self, config: UndialConfig):
        self.config = config

    def phases(self, epoch: int) -> list[Phase]:
        if self.config.alpha == 0:
            return [Phase("forget", "forget", self.config.batch_size)]
        return [Phase("paired", "paired", self.config.batch_size)]

    parts = ("forget", "retain")  # token means over the forget and over the retain answer tokens

    def part_counts(self, phase, batch: dict) -> tuple[int, int]:
        if phase == "forget":
            return int(batch["labels"].shape[0]), 0
        f = batch["forget_token"]
        return int(f.sum()), int((~f).sum())

    def loss(self, phase, student_logits, teacher_logits, labels, batch=None) -> LossTerms:
        c = self.config
        if phase == "forget":
            forget = c.gamma * undial_sum(student_logits, teacher_logits, labels, c.beta)
            return LossTerms(total=forget, count=int(labels.shape[0]), parts=(forget, forget.new_zeros(())))
        if batch is None or "forget_token" not in batch:
            raise ValueError("UNDIAL needs batches from a PairedStream (forget rows paired with retain rows)")
        f = batch["forget_token"]
        forget = c.gamma * undial_sum(student_logits[f], teacher_logits[f], labels[f], c.beta)
        retain = c.alpha * cross_entropy_sum(student_logits[~f], labels[~f])
        return LossTerms(total=forget + retain, count=int(labels.shape[0]), parts=(forget, retain))
