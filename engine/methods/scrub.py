"""SCRUB (Kurmanji et al., NeurIPS 2023) and SCRUB+R, as docs/algorithm.md states them.

The student starts at the teacher (a frozen copy of the original). Each epoch e <= msteps first makes
one pass of max-steps over the forget set (ascent on the teacher-student divergence), then every epoch
makes one pass of min-steps over the retain set (stay close to the teacher, fit the labels). One
optimizer is shared by both phases; the learning rate is set per epoch by ``lr_at``.

``schedule=calibrated`` (docs/algorithm.md, "The calibrated schedule") replaces the max pass by a budget of
``max_steps_per_epoch`` steps (the forget set cycled or cut short), spent in epochs 1..msteps only while the
forget error is below its target (frozen at what the original shows on unseen data of the forget set's classes),
and ended early, every ``check_every`` max-steps, once it is reached; the optimizer's state is cleared when a
max phase ends (``reset_after_max``), so the min phase does not carry the ascent on. The method holds that state
(``ScheduleState``); the recipe measures the errors and hands them to ``end_epoch`` (after each epoch) and
``check`` (inside a max phase), which apply the rule; ``phases`` reads the state.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from engine.methods.base import LossTerms, Method, OptimizerSettings, Phase, Probe
from engine.methods.losses import (
    TeacherProbs,
    cross_entropy_sum,
    distill_kl_sum,
    kl_and_ce_sum,
    parameter_distance,
)


class ScrubConfig(OptimizerSettings):
    """Defaults are the paper's large-scale row (docs/algorithm.md, "The paper's settings, per scenario")."""

    name: Literal["scrub"] = Field("scrub", description="Method name.")
    epochs: int = Field(3, ge=1, description="Total epochs E (max+min epochs first, then min-only epochs).")
    msteps: int = Field(
        2,
        ge=0,
        description="M: epochs 1..M start with a max-step pass over the forget set (schedule=calibrated: at most "
        "these epochs have a max phase, each of at most max_steps_per_epoch steps, and only while the target "
        "is not met).",
    )
    schedule: Literal["paper", "calibrated"] = Field(
        "paper",
        description="paper: one max pass over the forget set in each of epochs 1..msteps. calibrated: each of "
        "those epochs whose start finds the forget error below its target spends up to max_steps_per_epoch "
        "max-steps whatever the forget set's size, ending early once a check finds the target reached; the "
        "target is what unseen data of the forget set's classes shows on the original (100% for a class the "
        "retain set lacks, else the original's validation error on that class; causal LMs: the forget answers' "
        "NLL against the original's NLL on holdout rows). Needs eval.every_epoch.",
    )
    max_steps_per_epoch: int = Field(
        16,
        ge=1,
        description="schedule=calibrated: max-steps (forget batches of forget_batch_size) in each epoch's max "
        "phase: a smaller forget set is cycled, each pass in a fresh shuffled order; a larger one is cut short. "
        "The run's budget is msteps x max_steps_per_epoch. Ignored by schedule=paper.",
    )
    target_tolerance: float | None = Field(
        None,
        ge=0,
        description="schedule=calibrated: the target counts as reached when the forget measure is at least the "
        "target minus this much, in the task's unit: points of error (percent) for image classifiers, nats of "
        "answer NLL for causal LMs. None: the task's default (1 point; 0.05 nats). Ignored by schedule=paper.",
    )
    check_every: int = Field(
        2,
        ge=1,
        description="schedule=calibrated: inside a max phase, the forget error is measured (eval mode, the "
        "forget set only) after every check_every max-steps, and the phase ends there once the target is "
        "reached. Ignored by schedule=paper.",
    )
    reset_after_max: bool = Field(
        True,
        description="schedule=calibrated: clear the optimizer's state (Adam's moments, SGD's momentum) when a "
        "max phase ends, so that the min-steps after it do not carry the ascent on past the target (TOFU: "
        "forget NLL 2.93 -> 4.48 with it kept, 2.30 cleared; docs/algorithm.md). Ignored by schedule=paper "
        "(one optimizer state through both phases, as the authors' code).",
    )
    temperature: float = Field(
        4.0, gt=0, description="T of the divergence; the T^2 factor applies in both phases."
    )
    gamma: float = Field(0.99, ge=0, description="Weight of the retain cross-entropy in a min-step.")
    alpha: float = Field(0.001, ge=0, description="Weight of the retain divergence in a min-step.")
    forget_batch_size: int = Field(512, ge=1, description="B_f: batch size of the max-step pass.")
    retain_batch_size: int = Field(256, ge=1, description="B_r: batch size of the min-step pass.")
    rewind: bool = Field(
        False,
        description="SCRUB+R: also export the epoch whose forget error is closest to the final forget-validation error.",
    )
    param_distance: float = Field(
        0.0,
        ge=0,
        description="Weight of the paper-era penalty sum ||theta - theta_orig||_F added to every batch loss (0.5 in that code). Off: 0.",
    )
    augment: bool = Field(
        False,
        description="Random crop + flip on unlearning batches (off as the authors' unlearning loaders).",
    )
    chunk_rows: int | None = Field(
        4096,
        ge=1,
        description="Rows (examples, or answer tokens of a causal LM) per chunk of the divergence: at most "
        "chunk_rows x vocab float32 probabilities exist at once. None: the whole batch at once.",
    )
    teacher_cache: Literal["auto", "off"] = Field(
        "auto",
        description="auto: the frozen teacher's outputs are computed once, before the first step, by the student "
        "(equal to the teacher then), and the teacher is never loaded: full logits for classifiers; for causal "
        "LMs full logits while they fit teacher_cache_bytes, else the top teacher_cache_topk logits per token "
        "plus one tail bucket (its mass is reported). Off by itself with augment or param_distance. off: a "
        "teacher forward every step.",
    )
    teacher_cache_topk: int = Field(
        64, ge=1, description="Logits kept per answer token when a causal LM's full logits exceed the budget."
    )
    teacher_cache_bytes: int = Field(
        2**30, ge=0, description="Budget of full cached logits per stream and process (bytes) before top-k."
    )
    # Remedies for the start-at-teacher problem (docs/algorithm.md, "The start-at-teacher problem"): a causal LM with dropout 0
    # starts with student == teacher, where the divergence and its gradient are exactly 0, so
    # faithful max-steps cannot move it. All off = the faithful method.
    forget_nll: float = Field(
        0.0,
        ge=0,
        description="Weight of a forget-set NLL ascent term added to the max-step loss (-d_T - w * NLL). "
        "Gives the first max-step a non-zero gradient. 0: faithful SCRUB.",
    )
    min_first: bool = Field(
        False,
        description="In max+min epochs run the min pass before the max pass, so the student has left the "
        "teacher when the first max-step comes. False: faithful order (max first).",
    )
    student_dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Set the student's dropout (causal LMs: attention/hidden dropout in its config) for "
        "unlearning; the teacher keeps eval mode, so train-mode noise separates the two. None: unchanged.",
    )

    @field_validator("teacher_cache", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        # YAML 1.1 reads a bare `off` as false (and `on` as true): take them as the words meant
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _msteps_within_epochs(self) -> ScrubConfig:
        if self.msteps > self.epochs:
            raise ValueError(f"msteps ({self.msteps}) cannot exceed epochs ({self.epochs})")
        return self

    def check_run(self, run: Any) -> None:
        """The calibrated schedule steers by what unseen data shows: a class-aware validation error for image
        classifiers, the holdout rows' NLL for causal LMs; its tolerance defaults to one unit step of the task's
        measure: 1 point of error, 0.05 nats (about 2% of an unseen answer's NLL). SCRUB+R on text data steers by
        the holdout NLL too. (That both need eval.every_epoch is checked by the commands that run the method:
        the audit's reference trainings turn it off.)"""
        if run.model.lora is not None and self.param_distance:
            raise ValueError(
                "method.param_distance compares the student's weights with the teacher's, which a LoRA student "
                "shares: unset model.lora or set method.param_distance=0"
            )
        if self.target_tolerance is None:
            self.target_tolerance = 1.0 if run.task == "image_classification" else 0.05
        text = run.task == "causal_lm" and run.data.preset != "tofu"
        if self.schedule == "calibrated" and text and run.holdout.dataset is None:
            raise ValueError(
                "method.schedule=calibrated steers the forget NLL towards the NLL of rows the model never saw: set "
                "holdout.dataset (or use method.schedule=paper)"
            )
        if (
            self.schedule == "calibrated"
            and run.task == "image_classification"
            and run.data.val_fraction == 0
        ):
            raise ValueError(
                "method.schedule=calibrated compares the forget error with validation errors: set "
                "data.val_fraction above 0"
            )
        if self.rewind and text and not run.holdout.dataset:
            raise ValueError("SCRUB+R on text data steers by the holdout NLL: set holdout.dataset")

    def every_epoch_reason(self) -> str | None:
        if self.rewind:
            return "SCRUB+R (method.rewind=true) needs eval.every_epoch=true"
        if self.schedule == "calibrated":
            return "method.schedule=calibrated decides after each epoch from its errors: set eval.every_epoch=true"
        return None


@dataclass
class ScheduleState:
    """What the calibrated schedule has decided so far (checkpointed with the run, so a resumed run takes
    the same decisions): the frozen target (set by epoch 0, the original), whether the next max phase may
    run, the max-steps made, the epoch whose max phase a check ended early and after how many steps (None:
    none this epoch), and the first epoch after which the target was reached (None: not yet)."""

    target_error: float | None = None
    max_open: bool = True
    max_steps_spent: int = 0
    ended_early: list[int] | None = None  # [epoch, steps]: this epoch's max phase stopped at a check
    reached_after: int | None = None


class Scrub(Method):
    """The SCRUB method: phases per epoch, the per-batch losses, and its schedule's decisions (the calibrated
    schedule's after each epoch and at checks inside a max phase; SCRUB+R's choice of epoch). Knows nothing of
    where it runs: what it measures comes through the recipe's ``Probe``."""

    needs_teacher = True
    needs = ("teacher",)

    def __init__(self, config: ScrubConfig):
        self.config = config
        self.schedule_state = ScheduleState()  # read by phases() under schedule=calibrated only
        self.checks: list[dict] = []  # the calibrated schedule's checks inside max phases, for the report

    @property
    def augment(self) -> bool:
        return self.config.augment

    @property
    def student_dropout(self) -> float | None:
        return self.config.student_dropout

    @property
    def needs_teacher_weights(self) -> bool:
        return bool(self.config.param_distance)

    def teacher_cache_off(self) -> str | None:
        """The teacher's outputs are the same every epoch only when the rows are, and its weights never needed."""
        c = self.config
        if c.teacher_cache == "off":
            return ""
        if c.augment:
            return "method.augment=true shows new crops and flips every epoch"
        if c.param_distance:
            return "method.param_distance needs the teacher's weights"
        return None

    @property
    def calibrated(self) -> bool:
        return self.config.schedule == "calibrated"

    def max_steps(self, epoch: int) -> int | None:
        """Max-steps of ``epoch``'s max phase: 0 = no max phase; None = one pass over the forget set (paper)."""
        c = self.config
        if epoch > c.msteps:
            return 0
        if not self.calibrated:
            return None
        s = self.schedule_state
        if not s.max_open:
            return 0
        if s.ended_early is not None and s.ended_early[0] == epoch:
            return s.ended_early[1]  # a resumed epoch: its max phase already ended at a check
        return c.max_steps_per_epoch

    def phases(self, epoch: int) -> list[Phase]:
        c = self.config
        retain = Phase("min", "retain", c.retain_batch_size)
        steps = self.max_steps(epoch)
        if steps != 0:
            fresh = self.calibrated and c.reset_after_max
            forget = Phase("max", "forget", c.forget_batch_size, steps=steps, fresh_optimizer=fresh)
            return [retain, forget] if c.min_first else [forget, retain]  # faithful: max first
        return [retain]

    def streams(self) -> set[str]:
        """Every stream a phase of this run may read (the calibrated schedule decides its max phases as it goes)."""
        return {"retain"} | ({"forget"} if self.config.msteps > 0 else set())

    def _reached(self, forget_error: float, target_error: float) -> bool:
        if not (math.isfinite(forget_error) and math.isfinite(target_error)):
            raise ValueError(
                f"schedule=calibrated: forget error {forget_error} or its target {target_error} is not a number "
                "(a retained class of the forget set has no validation example: raise data.val_fraction)"
            )
        tolerance = self.config.target_tolerance
        if tolerance is None:  # the run config's validation sets the task's default (engine/config.py)
            raise ValueError(
                "schedule=calibrated needs method.target_tolerance: set it, or load the run config"
            )
        return forget_error >= target_error - tolerance

    def end_epoch(self, epoch: int, forget_error: float, target_error: float) -> dict:
        """The calibrated rule after ``epoch`` (epoch 0: the original, before any step). Epoch 0 freezes the
        target (``target_error``: what unseen data of the forget set's classes shows on the original); later
        epochs' ``target_error`` is ignored. The next epoch, if one of 1..msteps, has a max phase exactly when
        the forget error is below the target minus the tolerance: min-steps that pulled it back below reopen
        it; after epoch msteps only min-steps repair. Both numbers must be the same on every rank (the recipe
        broadcasts the main rank's). Returns the history row's record of the decision."""
        if not self.calibrated:
            raise ValueError("end_epoch is the calibrated schedule's rule: method.schedule is 'paper'")
        s = self.schedule_state
        if epoch == 0 or s.target_error is None:
            s.target_error = float(target_error)
        made = (self.max_steps(epoch) or 0) if epoch > 0 else 0  # epoch 0 made none (None: paper only)
        s.max_steps_spent += made
        reached = self._reached(forget_error, s.target_error)
        if reached and s.reached_after is None:
            s.reached_after = epoch
        s.max_open, s.ended_early = not reached, None
        return {"target_error": s.target_error, "max_steps": made, "max_steps_spent": s.max_steps_spent,
                "target_reached": reached, "max_open": s.max_open}  # fmt: skip

    def check(self, epoch: int, steps: int, forget_error: float) -> bool:
        """Inside ``epoch``'s max phase after ``steps`` max-steps: True ends the phase there (the target is
        reached; recorded, so a run resumed in this epoch skips the rest of it). The same on every rank when
        ``forget_error`` is (the recipe broadcasts it)."""
        if not self._reached(forget_error, self.schedule_state.target_error):
            return False
        self.schedule_state.ended_early = [epoch, steps]
        return True

    def check_due(self, epoch: int, steps: int) -> bool:
        """Whether the recipe measures the forget error after max-step ``steps`` of ``epoch`` (not after the
        last: the epoch's own evaluation follows)."""
        budget = self.max_steps(epoch) or 0
        return self.calibrated and steps % self.config.check_every == 0 and steps < budget

    def state_dict(self) -> dict:
        """The schedule's state and its checks so far (JSON), for the run's checkpoint."""
        return {**asdict(self.schedule_state), "checks": self.checks}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.checks = list(state.pop("checks", []))
        self.schedule_state = ScheduleState(**state)

    # --- the hooks `unlearn run` calls (engine/methods/base.py: Method)
    def after_epoch(self, epoch: int, row: dict, probe: Probe) -> dict:
        """The calibrated rule after ``epoch`` (0: the original), on the main rank's measurements."""
        if not self.calibrated:
            return {}
        forget_error, target = probe.calibration(row)
        return {"forget_target_error": target, **self.end_epoch(epoch, forget_error, target)}

    def check_in_phase(self, epoch: int, phase: str, step: int, probe: Probe) -> bool:
        """The calibrated schedule's check inside a max phase: the forget measure now, against the target."""
        if phase != "max" or not self.check_due(epoch, step):
            return False
        started = time.perf_counter()
        measured = probe.forget()
        ended = self.check(epoch, step, measured)
        self.checks.append({"epoch": epoch, "step": step, "forget_error": measured, "ended": ended,
                            "seconds": round(time.perf_counter() - started, 4)})  # fmt: skip
        if ended:
            probe.log(f"epoch {epoch}: max phase ended after {step} max-steps: the forget set's {probe.unit} "
                      f"{measured:.4g} reached its target {self.schedule_state.target_error:.4g}")  # fmt: skip
        return ended

    @property
    def keeps_every_epoch(self) -> bool:
        return self.config.rewind  # SCRUB+R picks one of them (epoch 0 = the original)

    def choose_final(self, history: list[dict], final: dict, probe: Probe) -> tuple[int, dict] | None:
        """SCRUB+R: the epoch whose forget series is closest to the target (ties: earliest), the task saying what
        the series and target are; under the calibrated schedule, the target its max phases steered by (frozen at
        epoch 0): both aim at one number."""
        if not self.config.rewind:
            return None
        series, target, steering = probe.rewind(history, final)
        if self.calibrated:
            target = history[0]["target_error"]
            rest = {k: v for k, v in steering.items() if not k.startswith("target_")}
            steering = {"target_error": target, "steered_by": "target_error", **rest}
        epoch = select_rewind_epoch(series, target)
        probe.log(f"SCRUB+R: target {target:.4g} -> epoch {epoch}")
        return epoch, steering

    def report(self) -> dict:
        return {"schedule_checks": self.checks if self.calibrated else None}

    def loss(
        self,
        phase: str,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        batch: dict | None = None,
    ) -> LossTerms:
        c = self.config
        if isinstance(teacher_logits, TeacherProbs) and c.temperature == 1 and phase in ("max", "min"):
            # cached teacher at T = 1 (the causal-LM recipes): divergence and cross-entropy in one pass
            if phase == "max":  # -(KL + forget_nll * CE)
                total = -kl_and_ce_sum(
                    student_logits, teacher_logits, labels, 1.0, c.forget_nll, c.chunk_rows
                )
            else:
                total = kl_and_ce_sum(student_logits, teacher_logits, labels, c.alpha, c.gamma, c.chunk_rows)
            return LossTerms(total=total, count=int(student_logits.shape[0]))
        kl = distill_kl_sum(student_logits, teacher_logits, c.temperature, c.chunk_rows)
        if phase == "max":
            total = -kl  # ascent on the divergence; labels unused, weight 1
            if c.forget_nll:
                total = total - c.forget_nll * cross_entropy_sum(student_logits, labels, c.chunk_rows)
        elif phase == "min":
            total = c.gamma * cross_entropy_sum(student_logits, labels, c.chunk_rows) + c.alpha * kl
        else:
            raise ValueError(f"SCRUB has phases 'max' and 'min', not {phase!r}")
        return LossTerms(total=total, count=int(student_logits.shape[0]))

    def penalty(self, student: torch.nn.Module, teacher: torch.nn.Module) -> torch.Tensor | None:
        if self.config.param_distance == 0:
            return None
        return self.config.param_distance * parameter_distance(student.parameters(), teacher.parameters())


def select_rewind_epoch(forget_errors: list[float], target_error: float) -> int:
    """SCRUB+R: the epoch j (0 = the original) whose forget-set error is closest to ``target_error``
    (the final model's error on the forget-validation set); ties go to the earliest epoch."""
    if not forget_errors:
        raise ValueError("SCRUB+R needs the forget error of at least epoch 0")
    distances = [abs(e - target_error) for e in forget_errors]
    return distances.index(min(distances))  # index() returns the first minimum: earliest epoch wins ties
