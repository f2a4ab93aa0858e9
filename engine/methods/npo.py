"""NPO (Zhang et al. 2024, "Negative Preference Optimization"; open-unlearning ``NPO``): the forget
answers are treated as dispreferred responses against the frozen original (the reference model):
loss = gamma * mean_seq[-2/beta * log sigmoid(-beta * (log pi(y|x) - log pi_ref(y|x)))] + alpha * NLL_retain,
with log pi the summed log-probability of the whole answer."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from engine.methods.base import LossTerms, Method, Phase
from engine.methods.grad_diff import GradDiffConfig
from engine.methods.losses import cross_entropy_sum, npo_sum, sequence_nll


class NpoConfig(GradDiffConfig):
    name: Literal["npo"] = Field("npo", description="Method name.")
    beta: float = Field(0.1, gt=0, description="NPO's inverse temperature beta.")


class Npo(Method):
    needs_teacher = True  # the reference model pi_ref = the frozen original
    needs = ("teacher", "paired")

    def __init__(self, config: NpoConfig):
        self.config = config

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("paired", "paired", self.config.batch_size)]

    parts = ("forget", "retain")  # a mean over the forget sequences, a token mean over the retain answers

    def part_counts(self, phase, batch: dict) -> tuple[int, int]:
        return int(batch["is_forget"].sum()), int((~batch["forget_token"]).sum())

    label = "NPO"  # in its error messages

    def forget_sum(self, nll: torch.Tensor, teacher_logits, labels, seq, n: int, is_f) -> torch.Tensor:
        """The forget term's sum over the forget sequences, from their summed answer NLLs ``nll`` (SimNPO, a
        subclass, replaces only this)."""
        ref_nll = sequence_nll(teacher_logits.detach(), labels, seq, n)[is_f]
        return npo_sum(nll, ref_nll, self.config.beta)

    def loss(self, phase, student_logits, teacher_logits, labels, batch=None) -> LossTerms:
        c = self.config
        if batch is None or "is_forget" not in batch:
            raise ValueError(
                f"{self.label} needs batches from a PairedStream (forget rows paired with retain rows)"
            )
        n = int(batch["is_forget"].shape[0])
        seq, is_f = batch["sequence"], batch["is_forget"]
        nll = sequence_nll(student_logits, labels, seq, n)[is_f]
        forget = c.gamma * self.forget_sum(nll, teacher_logits, labels, seq, n, is_f)
        r = ~batch["forget_token"]
        retain = c.alpha * cross_entropy_sum(student_logits[r], labels[r])
        return LossTerms(total=forget + retain, count=int(labels.shape[0]), parts=(forget, retain))
