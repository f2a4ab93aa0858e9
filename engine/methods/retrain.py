"""Retrain (exact unlearning, the gold standard): re-initialise the student and train it with ERM on
D_r alone (docs/evaluation.md; the reference code pads D_r back to |D| with duplicates
of random retain examples, this one does not). The same recipe as ``unlearn train``'s Retrain, run
through ``unlearn run`` so it sits beside the other baselines with the same data, seed and report."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.methods.base import MethodContext, OptimizerSettings
from engine.methods.blocks import reinitialise
from engine.methods.erm import Erm


class RetrainConfig(OptimizerSettings):
    """Defaults are the engine's training recipe (``train``: 16 epochs, SGD lr 0.05 decayed after 8 and 12)."""

    name: Literal["retrain"] = Field("retrain", description="Method name.")
    epochs: int = Field(16, ge=1, description="Training epochs on D_r, from a fresh initialisation.")
    lr: float = Field(0.05, gt=0, description="Initial learning rate.")
    lr_decay_epochs: list[int] = Field(
        default_factory=lambda: [8, 12], description="Epochs after which the lr decays."
    )
    batch_size: int = Field(64, ge=1, description="Retain examples per step.")
    augment: bool = Field(True, description="Random crop (4-pixel padding) + horizontal flip.")


class Retrain(Erm):
    """ERM on the retain stream after ``prepare`` has re-initialised every weight and BatchNorm
    statistic (a fresh model of the student's class, drawn from torch's RNG, which the recipe seeds)."""

    needs_teacher = False
    needs = (
        "classifier_head",
    )  # a from-scratch re-initialisation (`unlearn train` makes a causal LM's retain model)

    prepares_student = True

    def prepare(self, student, ctx: MethodContext) -> None:
        reinitialise(student)
