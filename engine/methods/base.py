"""What every method shares: the optimizer settings, the per-epoch learning-rate rule, the small types through
which a method talks to the loop (phases in, loss sums out), and the ``Method`` protocol: what the loop and the
recipes call on a method, with a no-op default for every optional hook, so a recipe never asks a method what it
has (a new method with a schedule of its own is one file: engine/methods/scrub.py is the example).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import Field, model_validator

from engine.settings import StrictModel


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

    def check_run(self, run: Any) -> None:
        """Rules between this method's settings and the rest of the run config (``run``: a RunConfig), raised as
        ValueError with a one-line message whenever a run config is validated (engine/config/rules.py). None
        here; SCRUB's schedules have some."""

    def every_epoch_reason(self) -> str | None:
        """Why running this method needs eval.every_epoch=true (its schedule decides from per-epoch scores);
        None: it does not."""
        return None

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


@dataclass
class Probe:
    """What a method's schedule hooks may measure, built by the recipe from the task and the backend; every value is
    the main rank's, broadcast, so every rank takes the same decision.

    ``forget()``: the forget set's measure now (eval mode): error in percent, or a causal LM's answer NLL;
    ``calibration(row)``: (that measure, what unseen data of the same kind shows) from a history row;
    ``rewind(history, final)``: SCRUB+R's per-epoch forget series, its target and how the report names them
    (engine/tasks); ``unit``: the measure's name, for logs; ``log``: the run's log."""

    forget: Callable[[], float]
    calibration: Callable[[dict], tuple[float, float]]
    rewind: Callable[[list[dict], dict], tuple[list[float], float, dict]]
    unit: str
    log: Callable[[str], None]


class Method(Protocol):
    """What the loop (engine/loop.py) and `unlearn run` (engine/recipes/unlearn.py) call on a method.

    Required: ``config`` (its settings, an ``OptimizerSettings``), ``phases(epoch)`` and ``loss(...)``; the class
    attributes say what it needs: ``needs_teacher`` (the loop computes teacher logits), ``needs`` (what the task
    must provide: "teacher", "paired", "classifier_head"; the config refuses a method its task cannot serve),
    ``prepares_student`` (its ``prepare`` edits the whole model: refused with a LoRA student or under ZeRO-3).
    Every hook below has a default that does nothing; a method subclasses ``Method`` and overrides the ones it
    uses."""

    config: OptimizerSettings
    needs_teacher: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ()
    prepares_student: ClassVar[bool] = False
    # a loss that is a sum of means over different item sets (GradDiff: forget and retain tokens): their names,
    # each counted by part_counts over the whole global batch (LossTerms)
    parts: ClassVar[tuple[str, ...]] = ()

    def phases(self, epoch: int) -> list[Phase]: ...

    def loss(
        self, phase: str, student_logits: torch.Tensor, teacher_logits: Any, labels: torch.Tensor, batch=None
    ) -> LossTerms: ...

    # --- what a step may add
    def outputs(
        self, forward: Callable[[torch.nn.Module, dict], torch.Tensor]
    ) -> Callable[[torch.nn.Module, dict], Any]:
        """The forward the loop runs on the teacher and on the student in place of the task's ``forward`` (the
        logits a loss counts); what it returns is what ``loss`` receives as ``student_logits`` / ``teacher_logits``.
        By default the task's forward itself; RMU wraps it to return a decoder layer's hidden states instead."""
        return forward

    def penalty(self, student: torch.nn.Module, teacher: torch.nn.Module | None) -> torch.Tensor | None:
        """An un-normalised term added to every batch's loss (SCRUB's parameter distance); None: nothing."""
        return None

    def teacher_for(self, phase: str, teacher: torch.nn.Module | None) -> torch.nn.Module | None:
        """The teacher whose logits ``phase``'s loss receives (Bad-Teacher's random network on its forget
        phase); by default the run's teacher, the frozen original."""
        return teacher

    def part_counts(self, phase: str, batch: dict) -> tuple[int, ...]:
        """Each of ``parts``' item counts in ``batch`` (none when the loss is one mean)."""
        return ()

    # --- before training
    def check_model(self, student: torch.nn.Module) -> None:
        """Refuse, before any work, a model this method cannot run on (CF-k's k beyond its blocks).

        It sees the plain loaded model on every backend, before a LoRA adapter is applied and before the backend
        builds the optimizer or the DeepSpeed engine (both take only parameters with ``requires_grad``), so it is
        also where a method that trains only some weights (RMU) sets ``requires_grad=False`` on the others: a
        flag, no weight is read, so it holds under ZeRO-3's partitioned loading; a LoRA student then has every
        base weight frozen by peft, and its adapters decide what trains."""

    def prepare(self, student: torch.nn.Module, ctx: MethodContext) -> None:
        """Called once by `unlearn run` after the original is scored and BEFORE the backend builds the optimizer
        (so what it freezes stays out of it): re-initialise, perturb or freeze parts of the student in place,
        build extra frozen models with ``ctx.freeze``. Its time counts in the run's ``train_seconds``. Only
        called when ``prepares_student``."""

    @property
    def augment(self) -> bool:
        """Random crops and flips on the streams (image methods with an ``augment`` setting)."""
        return False

    @property
    def student_dropout(self) -> float | None:
        """The student's dropout during unlearning (None: the model's own)."""
        return None

    @property
    def needs_teacher_weights(self) -> bool:
        """The teacher's weights themselves are read (a penalty on the distance to them), not only its logits."""
        return False

    def teacher_cache_off(self) -> str | None:
        """None: the frozen teacher's outputs may be computed once before the first step (engine/teacher_cache.py)
        instead of a teacher forward every step; otherwise why not ("": simply not asked for)."""
        return ""

    def streams(self) -> set[str]:
        """Every stream a phase of this run may read."""
        return {p.stream for e in range(1, self.config.epochs + 1) for p in self.phases(e)}

    # --- the schedule: decisions taken from measurements as the run goes
    @property
    def keeps_every_epoch(self) -> bool:
        """Every epoch's checkpoint is kept until the run ends, epoch 0 too (``choose_final`` picks one)."""
        return False

    def after_epoch(self, epoch: int, row: dict, probe: Probe) -> dict:
        """Called with each epoch's history row, epoch 0 (the original) first, before that epoch's checkpoint (which
        then holds what was decided); returns what to add to the row. Nothing here."""
        return {}

    def check_in_phase(self, epoch: int, phase: str, step: int, probe: Probe) -> bool:
        """Asked after every step on every rank: True ends ``phase`` there. Never here."""
        return False

    def choose_final(self, history: list[dict], final: dict, probe: Probe) -> tuple[int, dict] | None:
        """An earlier epoch whose weights are exported beside the final model (SCRUB+R: ``model_rewound``), with
        what the report says of the choice; None: only the final model."""
        return None

    def state_dict(self) -> dict:
        """What the schedule decided so far (JSON), kept in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` on resume."""

    def report(self) -> dict:
        """Entries this method adds to report.json."""
        return {}
