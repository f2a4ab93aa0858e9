"""What every method shares: the optimizer settings, the per-epoch learning-rate rule, and the
small types through which a method talks to the loop (phases in, loss sums out).

A method is any object with ``config`` (an ``OptimizerSettings``), ``needs_teacher``, ``needs`` (what a task must
provide: "teacher", "paired", "classifier_head"; the config refuses a method its task cannot serve),
``phases(epoch)``,
``loss(...)`` and ``penalty(student, teacher)``. Two hooks are optional, and methods without them are
untouched:

- ``prepare(student, ctx: MethodContext) -> None``: called once by ``unlearn run`` after the
  original has been evaluated and the teacher copied, and BEFORE the backend builds the optimizer, so that
  parameters it freezes (``requires_grad_(False)``) are left out of the optimizer. It may change the
  student in place (re-initialise it, perturb it, freeze parts of it) and build extra frozen models with
  ``ctx.freeze``. Its time counts in the run's ``loop_seconds`` / ``train_seconds``.
- ``teacher_for(phase, teacher) -> module``: the teacher whose logits a phase's ``loss`` receives (default:
  the run's teacher, the frozen original). Only consulted when ``needs_teacher`` is true.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a config must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimizerSettings(StrictModel):
    """One optimizer, built once and shared by every phase of a method (docs/algorithm.md, "The faithful schedule")."""

    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "sgd",
        description="sgd (with momentum) or adam: weight decay is coupled L2; adamw: decoupled (language models).",
    )
    lr: float = Field(5e-4, gt=0, description="Initial learning rate lr0.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by adam).")
    weight_decay: float = Field(
        5e-4, ge=0, description="Coupled L2 weight decay (torch's weight_decay, not AdamW's)."
    )
    lr_decay_epochs: list[int] = Field(
        default_factory=lambda: [3, 5, 9],
        description="Epochs d after which the lr is multiplied by lr_decay_rate: lr(e) = lr0 * rate ** #{d : e > d}.",
    )
    lr_decay_rate: float = Field(
        0.1, gt=0, le=1, description="Multiplier applied once per passed decay epoch."
    )
    epochs: int = Field(10, ge=1, description="Total epochs E.")

    @model_validator(mode="after")
    def _decay_epochs_increasing(self) -> OptimizerSettings:
        if sorted(self.lr_decay_epochs) != list(self.lr_decay_epochs):
            raise ValueError(f"lr_decay_epochs must be increasing, got {self.lr_decay_epochs}")
        return self

    def lr_at(self, epoch: int) -> float:
        """The learning rate of 1-based ``epoch``, as the authors' ``adjust_learning_rate`` (strict >)."""
        passed = sum(1 for d in self.lr_decay_epochs if epoch > d)
        return self.lr * self.lr_decay_rate**passed

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class Phase:
    """One pass over one stream. ``name`` is what the method's ``loss`` is told; ``stream`` is
    which data the loop draws (``"forget"`` or ``"retain"``). ``steps``: None = one pass; a number = exactly
    that many optimizer steps, cutting the pass short or cycling the stream in fresh shuffled passes
    (engine/backends/base.py, ``Backend.batches``). ``fresh_optimizer``: when the phase ends, the optimizer's
    state (Adam's moments) is cleared, so the next phase does not carry this one's momentum."""

    name: str
    stream: str
    batch_size: int
    steps: int | None = None
    fresh_optimizer: bool = False


@dataclass
class LossTerms:
    """A batch's loss as a SUM over counted items (examples or tokens) plus their count, so that the
    loop, not the method, decides the normaliser (the global count when data is sharded), plus an
    un-normalised ``penalty`` added once per step.

    A loss that is a sum of means over different sets of items (GradDiff: forget tokens and retain tokens;
    NPO: forget sequences and retain tokens) gives each mean's SUM in ``parts``, in the order of the method's
    ``parts`` names; the method's ``part_counts(phase, batch)`` gives each part's item count from the batch
    alone, and the loop divides each part by its count over the whole global batch (all micro-batches, all
    ranks). One normaliser for both would be exact only when both sets split in the same proportion, which
    token counts do not: 2 ranks would not equal 1."""

    total: torch.Tensor
    count: int
    penalty: torch.Tensor | None = None
    parts: tuple[torch.Tensor, ...] | None = None

    def mean(self, part_totals: tuple[float, ...] | None = None) -> torch.Tensor:
        """The batch's loss as one process computes it: ``total / count``, or each part over its total
        (``part_totals``: the counts of the whole global batch)."""
        if self.parts is None:
            return self.total / max(self.count, 1)
        return sum(p / max(float(n), 1.0) for p, n in zip(self.parts, part_totals, strict=True))


@dataclass
class MethodContext:
    """What a method's optional ``prepare`` hook may use (see the module docstring).

    ``forward(model, batch)`` returns logits (the loop's adapter); ``retain_batches(batch_size)`` yields
    batch dicts on the CPU over the whole retain set in a fixed order, without augmentation;
    ``freeze(model)`` is the backend's ``prepare_frozen`` (moved to the device, eval mode, no grads);
    ``device`` is where the student will train; ``forget_classes`` are the forgotten classes under class
    unlearning (``forget.kind=class``), else None.
    """

    forward: Callable[[torch.nn.Module, dict], torch.Tensor]
    retain_batches: Callable[[int], Iterator[dict]]
    freeze: Callable[[torch.nn.Module], torch.nn.Module]
    device: torch.device
    forget_classes: list[int] | None = None
