"""The one training loop. Every method and every backend goes through here, and this is the only
place where the order of a step lives:

    epoch -> lr -> phase -> step -> micro-batch -> teacher forward (no grad; or its cached outputs) -> student forward -> loss
          -> backward (backend) ... -> global loss (+ |loss|, stop requests), one all-reduce
          -> finite and bounded? -> optimizer step (backend) -> log -> stop requested? -> epoch hook

A method says which phases an epoch has and what a batch's loss is (as a sum + count); a backend
says where tensors live, which rows this process sees, and how a step is taken. A method's
``teacher_for(phase, teacher)`` chooses the teacher of each phase (Bad-Teacher's random network on the
forget phase; by default ``teacher``). ``train_step`` is one step's forwards and backwards, the part the
benchmarks time.

A position ``{"epoch", "phase", "phase_index", "step", "epoch_losses"}`` says where the loop goes on:
in ``epoch``, phase number ``phase_index`` after ``step`` of its steps (``epoch_losses``: the
phases' loss sums and step counts so far). A stop request (SIGTERM) on ANY rank is seen by all in
the same step: the loop hands the position to ``on_stop`` (the recipe checkpoints) and raises
PreemptedError; a restart passes the position back as ``start`` and goes on with the very next step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from engine import faults
from engine.errors import DivergenceError, PreemptedError


@dataclass
class LoopHooks:
    """Optional callbacks: ``on_step(epoch, phase, step, loss)``, ``on_epoch_end(epoch, losses)``
    where ``losses`` maps phase name -> mean loss of that epoch, ``should_stop()`` (asked after each
    step on every rank), ``on_stop(position)`` (write a checkpoint there) and ``end_phase(epoch, phase,
    step)`` (asked after each step on every rank, which must all answer the same: True ends the phase
    there, the next phase follows)."""

    on_step: Callable[[int, str, int, float], None] | None = None
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_stop: Callable[[dict], None] | None = None
    end_phase: Callable[[int, str, int], bool] | None = None


@dataclass
class LoopState:
    epoch: int = 0
    global_step: int = 0
    losses: dict[str, list[float]] = field(default_factory=dict)  # phase -> per-step loss, whole run


def run_loop(
    method,
    backend,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    streams: dict,
    forward: Callable[[torch.nn.Module, dict], torch.Tensor],
    *,
    seed: int,
    epochs: int,
    start: dict | None = None,
    hooks: LoopHooks | None = None,
    max_abs_loss: float | None = None,
    progress: bool = True,
    teacher_outputs=None,
) -> LoopState:
    """Run ``method`` from position ``start`` (default: the beginning) to the end of epoch ``epochs``, a
    ``train_step`` per global batch.
    ``forward(model, batch)`` returns logits. ``max_abs_loss``: a global step loss beyond it (or not
    finite) stops the run with DivergenceError before that step is applied. ``teacher_outputs``: a
    ``TeacherCache`` (engine/teacher_cache.py) whose streams' teacher logits are looked up, not computed."""
    hooks = hooks or LoopHooks()
    state = LoopState()
    start = start or {"epoch": 1, "phase_index": 0, "step": 0, "epoch_losses": {}}
    for epoch in range(start["epoch"], epochs + 1):
        state.epoch = epoch
        backend.set_lr(method.config.lr_at(epoch))  # set per epoch, before any phase (docs/algorithm.md)
        resumed = epoch == start["epoch"]
        sums = {k: list(v) for k, v in start["epoch_losses"].items()} if resumed else {}
        for index, phase in enumerate(method.phases(epoch)):
            if resumed and index < start["phase_index"]:
                continue  # done before the checkpoint this run resumed from
            skip = start["step"] if resumed and index == start["phase_index"] else 0
            stream = streams[phase.stream]
            # Train mode in BOTH phases: BatchNorm batch statistics and dropout are part of SCRUB.
            student.train()
            batches = backend.batches(
                stream, phase.batch_size, seed, epoch, phase.stream, skip=skip, steps=phase.steps
            )
            bar = tqdm(
                batches,
                initial=skip,
                total=backend.num_batches(stream, phase.batch_size) if phase.steps is None else phase.steps,
                desc=f"epoch {epoch}/{epochs} {phase.name}",
                disable=not (progress and backend.is_main),
                leave=False,
            )
            total, steps = sums.setdefault(phase.name, [0.0, 0])  # steps == skip when resumed mid-phase
            for micro_batches in bar:  # one optimizer step: this rank's micro-batches of one global batch
                value = train_step(
                    method,
                    backend,
                    student,
                    teacher,
                    phase,
                    micro_batches,
                    forward,
                    teacher_outputs=teacher_outputs,
                )
                if faults.inject("step", epoch, backend.rank, step=steps + 1):
                    value = value * math.nan
                stop = bool(hooks.should_stop and hooks.should_stop())
                # one all-reduce: the global batch's loss, its size, stop requests; the same on every rank
                value, size, stop = backend.sum_across_ranks([float(value), abs(float(value)), float(stop)])
                if not math.isfinite(value) or max_abs_loss is not None and size > max_abs_loss:
                    # Every rank sees it in the same step and stops BEFORE the optimizer step: nothing after
                    # the last good step is ever committed.
                    raise _diverged(value, max_abs_loss, f"{phase.name}-step", epoch, steps + 1, backend)
                backend.step()
                total, steps = total + value, steps + 1
                state.global_step += 1
                state.losses.setdefault(phase.name, []).append(value)
                bar.set_postfix(loss=f"{value:.4f}")
                if hooks.on_step:
                    hooks.on_step(epoch, phase.name, steps, value)
                sums[phase.name] = [total, steps]
                # decided before a stop is handled: a run resumed here finds the phase already ended
                ended = bool(hooks.end_phase and hooks.end_phase(epoch, phase.name, steps))
                if stop:
                    position = {"epoch": epoch, "phase": phase.name, "phase_index": index, "step": steps,
                                "epoch_losses": sums}  # fmt: skip
                    if hooks.on_stop:
                        hooks.on_stop(position)
                    raise PreemptedError(
                        f"stopped by a signal at epoch {epoch}, {phase.name} step {steps}; a checkpoint was "
                        "written there: run the same command again to resume"
                    )
                if ended:
                    break
            if phase.fresh_optimizer:  # after the phase's last step, however it ended
                backend.reset_optimizer()
        if hooks.on_epoch_end:
            hooks.on_epoch_end(epoch, {k: t / max(n, 1) for k, (t, n) in sums.items()})
    return state


def train_step(
    method,
    backend,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    phase,
    micro_batches: list[dict],
    forward: Callable[[torch.nn.Module, dict], torch.Tensor],
    *,
    teacher_outputs=None,
    clock: Callable[[str], AbstractContextManager] | None = None,
) -> float:
    """One optimizer step's forwards and backwards over this rank's micro-batches of one global batch (the
    backend's ``batches``): returns this rank's part of the global batch's mean loss. ``run_loop`` then sums it
    over ranks, guards it and asks the backend to step; the benchmarks that time a step call this too, with
    ``clock(part)``: a context manager around each "teacher", "student", "loss" and "backward" part."""
    timed = clock or (lambda part: nullcontext())
    forward = method.outputs(forward)  # what the loss reads: the logits, or (RMU) a layer's hidden states
    phase_teacher = method.teacher_for(phase.name, teacher)
    cached = method.needs_teacher and teacher_outputs is not None and phase.stream in teacher_outputs
    part_totals = None
    if method.parts:  # a loss of several means: each part's count over the whole global batch
        local = [0.0] * len(method.parts)
        for batch in micro_batches:
            if batch["share"] > 0:  # a stand-in counts nothing
                local = [a + b for a, b in zip(local, method.part_counts(phase.name, batch))]
        part_totals = backend.sum_across_ranks(local)
    value = torch.zeros(())
    for batch in micro_batches:
        teacher_logits = None
        if cached:  # computed once before the first step (engine/teacher_cache.py)
            with timed("teacher"):
                teacher_logits = teacher_outputs.lookup(phase.stream, batch)
        elif method.needs_teacher:
            with timed("teacher"), torch.no_grad(), backend.autocast():
                teacher_logits = forward(phase_teacher, batch)
        # a zero-weight stand-in (backends/base.py) is not data: it must not move BatchNorm's statistics
        stand_in = frozen_batchnorm(student) if batch["share"] == 0 else nullcontext()
        with timed("student"), stand_in, backend.autocast():
            student_logits = forward(student, batch)
        with timed("loss"):
            terms = method.loss(phase.name, student_logits, teacher_logits, batch["labels"], batch=batch)
            # this micro-batch's part of the global batch's mean (methods/base.py: summed over micro-batches and
            # ranks it is exactly the mean one process computes over the whole batch)
            if terms.parts is None:
                loss = terms.mean() * batch["share"]
            else:  # each part over its own global count (methods/base.py)
                loss = terms.mean(part_totals) * (1.0 if batch["share"] > 0 else 0.0)
            penalty = method.penalty(student, teacher)
            if penalty is not None:
                loss = loss + penalty * batch["share"]
        with timed("backward"):
            backend.backward(loss)
        value = value + loss.detach().float().cpu()
    return float(value)


@contextmanager
def frozen_batchnorm(model: torch.nn.Module) -> Iterator[None]:
    """BatchNorm layers in eval mode for one forward: their running statistics (and batch count) stay as they
    were. For a stand-in micro-batch, whose loss is multiplied by 0, so its gradient is 0 either way."""
    norms = [
        m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
    ]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def _diverged(
    value: float, bound: float | None, what: str, epoch: int, step: int, backend
) -> DivergenceError:
    kind = "non-finite" if not math.isfinite(value) else f"exploding (|loss| > {bound:g})"
    where = f" (seen by rank {backend.rank} of {backend.world_size})" if backend.world_size > 1 else ""
    return DivergenceError(
        f"{kind} {what} loss {value:.4g} at epoch {epoch}, step {step} of that phase{where}; nothing after the "
        "previous step was applied. Lower the learning rate or the number of max-steps (msteps), then run again "
        "(the last checkpoint is kept)"
    )
