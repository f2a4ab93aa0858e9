"""Retrain (exact unlearning, the gold standard): re-initialise the student and train it with ERM on
D_r alone (docs/evaluation.md; the reference code pads D_r back to |D| with duplicates
of random retain examples, this one does not). The same recipe as ``unlearn train``'s Retrain, run
through ``unlearn run`` so it sits beside the other baselines with the same data, seed and report."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.methods.base import MethodContext
from engine.methods.blocks import reinitialise
from engine.methods.erm import Erm, ErmConfig


class RetrainConfig(ErmConfig):
    """The engine's training recipe (``train``'s defaults: 16 epochs of SGD lr 0.05 decayed after 8 and 12, batches
    of 64, augmented), from a fresh initialisation on D_r."""

    name: Literal["retrain"] = Field("retrain", description="Method name.")


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
