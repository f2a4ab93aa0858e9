"""Bad-Teacher (Chundawat et al., AAAI 2023, "Can bad teaching induce forgetting?"): the student (a copy
of the original) distils from a competent teacher (the frozen original) on retain data and from an
incompetent teacher (a randomly initialised network of the same architecture) on forget data, with
``T^2 * KL(teacher || student)`` at temperature T (``distill_kl_sum``, as SCRUB's divergence).

Two phases per epoch rather than the paper's shuffled mixture of forget and retain rows: a "forget" pass
over D_f (teacher: the random network) and then a "retain" pass over D_r (teacher: the original); the
loop asks ``teacher_for`` which teacher a phase uses, so a step needs one teacher forward, not two.
Forget-first leaves the last word to the retain pass, which repairs utility. The paper distils on a
random 30% of D_r; here every epoch passes over the whole of D_r (no subsampling). The KL is a mean over
examples (batchmean) times T^2, where the paper's code uses PyTorch's element-mean without T^2: a constant
factor that Adam largely absorbs.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from engine.methods.base import LossTerms, Method, MethodContext, OptimizerSettings, Phase
from engine.methods.blocks import fresh_model
from engine.methods.losses import distill_kl_sum


class BadTeacherConfig(OptimizerSettings):
    """Defaults are the paper's: 1 epoch of Adam lr 1e-4 (no weight decay), T=4 as docs/algorithm.md states."""

    name: Literal["bad_teacher"] = Field("bad_teacher", description="Method name.")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="Optimizer.")
    lr: float = Field(1e-4, gt=0, description="Initial learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Coupled L2 weight decay.")
    lr_decay_epochs: list[int] = Field(
        default_factory=list, description="Epochs after which the lr decays (none by default)."
    )
    epochs: int = Field(1, ge=1, description="Epochs, each a forget pass then a retain pass.")
    temperature: float = Field(4.0, gt=0, description="T of the divergence (with the T^2 factor).")
    batch_size: int = Field(64, ge=1, description="Examples per step in both passes.")
    augment: bool = Field(False, description="Random crop (4-pixel padding) + horizontal flip.")


class BadTeacher(Method):
    needs_teacher = True  # the competent teacher: the frozen original the recipe copies
    needs = ("teacher", "classifier_head")  # a randomly initialised teacher's class distribution
    prepares_student = True  # builds its random teacher from the student's class

    def __init__(self, config: BadTeacherConfig):
        self.config = config
        self.incompetent: torch.nn.Module | None = None

    @property
    def augment(self) -> bool:
        return self.config.augment

    def prepare(self, student, ctx: MethodContext) -> None:
        """Build the incompetent teacher: a fresh model of the student's class (torch's seeded RNG), frozen."""
        self.incompetent = ctx.freeze(fresh_model(student))

    def teacher_for(self, phase: str, teacher: torch.nn.Module) -> torch.nn.Module:
        if phase == "forget":
            if self.incompetent is None:
                raise RuntimeError("Bad-Teacher's forget phase needs prepare() to build the random teacher")
            return self.incompetent
        return teacher

    def phases(self, epoch: int) -> list[Phase]:
        b = self.config.batch_size
        return [Phase("forget", "forget", b), Phase("retain", "retain", b)]

    def loss(self, phase, student_logits, teacher_logits, labels, batch=None) -> LossTerms:
        if phase not in ("forget", "retain"):
            raise ValueError(f"Bad-Teacher has phases 'forget' and 'retain', not {phase!r}")
        kl = distill_kl_sum(student_logits, teacher_logits, self.config.temperature)
        return LossTerms(total=kl, count=int(student_logits.shape[0]))
