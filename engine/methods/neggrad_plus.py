"""NegGrad+ (the SCRUB paper's strengthened NegGrad): each step descends the retain cross-entropy and
ascends the forget cross-entropy, ``beta * CE(retain) - (1 - beta) * CE(forget)``, each a mean over its
own half of the batch.

A step is a forget batch paired with as many retain examples drawn at random (``engine.data.paired.PairedStream``),
so an epoch is one pass over D_f, as the authors' loop zips the two loaders. Unlike their code the two
halves go through ONE forward, so BatchNorm's batch statistics (train mode) are those of the mixed batch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.methods.base import LossTerms, Method, OptimizerSettings, Phase
from engine.methods.grad_ascent import split_paired
from engine.methods.losses import cross_entropy_sum


class NegGradPlusConfig(OptimizerSettings):
    """Defaults: beta 0.95 (the paper's small-scale value; 0.9999 at large scale), 5 epochs of SGD lr 0.01."""

    name: Literal["neggrad_plus"] = Field("neggrad_plus", description="Method name.")
    beta: float = Field(
        0.95,
        ge=0,
        le=1,
        description="Weight of the retain CE; the forget CE is ascended with weight 1 - beta.",
    )
    epochs: int = Field(5, ge=1, description="Passes over the forget set.")
    lr: float = Field(0.01, gt=0, description="Initial learning rate.")
    lr_decay_epochs: list[int] = Field(
        default_factory=list, description="Epochs after which the lr decays (none by default)."
    )
    batch_size: int = Field(
        64, ge=1, description="Forget examples per step (each paired with a random retain example)."
    )
    augment: bool = Field(False, description="Random crop (4-pixel padding) + horizontal flip.")


class NegGradPlus(Method):
    needs_teacher = False
    needs = ("paired",)

    def __init__(self, config: NegGradPlusConfig):
        self.config = config

    @property
    def augment(self) -> bool:
        return self.config.augment

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("paired", "paired", self.config.batch_size)]

    # means over the forget items and over their retain partners' (images: rows; text: answer tokens)
    parts = ("forget", "retain")

    def part_counts(self, phase, batch: dict) -> tuple[int, int]:
        f = batch["forget_token"]
        return int(f.sum()), int((~f).sum())

    def loss(self, phase, student_logits, teacher_logits, labels, batch=None) -> LossTerms:
        b = self.config.beta
        (f_logits, f_labels), (r_logits, r_labels) = split_paired(student_logits, labels, batch)
        forget = -(1 - b) * cross_entropy_sum(f_logits, f_labels)
        retain = b * cross_entropy_sum(r_logits, r_labels)
        return LossTerms(total=forget + retain, count=int(labels.shape[0]), parts=(forget, retain))
