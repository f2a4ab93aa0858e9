"""The one training loop. Every method and every backend goes through here, and this is the only
place where the order of a step lives:

    epoch -> lr -> phase -> step -> micro-batch -> teacher forward (no grad) -> student forward -> loss
          -> backward (backend) ... -> global loss, finite on every rank? -> optimizer step (backend)
          -> log                                                                  -> epoch hook

A method says which phases an epoch has and what a batch's loss is (as a sum + count); a backend
says where tensors live, which rows this process sees, and how a step is taken. A method that defines
``teacher_for(phase, teacher)`` chooses the teacher of each phase (Bad-Teacher's random network on the
forget phase); otherwise every phase uses ``teacher``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from engine.errors import DivergenceError


@dataclass
class LoopHooks:
    """Optional callbacks: ``on_step(epoch, phase, step, loss)`` and ``on_epoch_end(epoch, losses)``
    where ``losses`` maps phase name -> mean loss of that epoch."""

    on_step: Callable[[int, str, int, float], None] | None = None
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None


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
    start_epoch: int = 1,
    hooks: LoopHooks | None = None,
    progress: bool = True,
) -> LoopState:
    """Run epochs ``start_epoch..epochs`` of ``method``. ``forward(model, batch)`` returns logits."""
    hooks = hooks or LoopHooks()
    state = LoopState()
    for epoch in range(start_epoch, epochs + 1):
        state.epoch = epoch
        backend.set_lr(method.config.lr_at(epoch))  # set per epoch, before any phase (SCRUB.md)
        epoch_losses: dict[str, float] = {}
        for phase in method.phases(epoch):
            stream = streams[phase.stream]
            phase_teacher = (
                method.teacher_for(phase.name, teacher) if hasattr(method, "teacher_for") else teacher
            )
            # Train mode in BOTH phases: BatchNorm batch statistics and dropout are part of SCRUB.
            student.train()
            batches = backend.batches(stream, phase.batch_size, seed, epoch, phase.stream)
            bar = tqdm(
                batches,
                total=backend.num_batches(stream, phase.batch_size),
                desc=f"epoch {epoch}/{epochs} {phase.name}",
                disable=not (progress and backend.is_main),
                leave=False,
            )
            total, steps = 0.0, 0
            for micro_batches in bar:  # one optimizer step: this rank's micro-batches of one global batch
                value = torch.zeros(())
                for batch in micro_batches:
                    teacher_logits = None
                    if method.needs_teacher:
                        with torch.no_grad():
                            teacher_logits = forward(phase_teacher, batch)
                    student_logits = forward(student, batch)
                    terms = method.loss(
                        phase.name, student_logits, teacher_logits, batch["labels"], batch=batch
                    )
                    # this micro-batch's part of the global batch's mean (base.py: summed over micro-batches
                    # and ranks it is exactly the mean one process computes over the whole batch)
                    loss = terms.total / max(terms.count, 1) * batch["share"]
                    penalty = method.penalty(student, teacher)
                    if penalty is not None:
                        loss = loss + penalty * batch["share"]
                    backend.backward(loss)
                    value = value + loss.detach().float().cpu()
                value = backend.sum_across_ranks(
                    float(value)
                )  # the global batch's loss, the same on every rank
                if not math.isfinite(value):
                    # Every rank sees it in the same step and stops BEFORE the optimizer step: nothing after
                    # the last good step is ever committed.
                    raise DivergenceError(
                        f"non-finite {phase.name}-step loss at epoch {epoch}, step {steps + 1} of that phase; "
                        "lower the learning rate or the number of max-steps (msteps)"
                    )
                backend.step()
                total, steps = total + value, steps + 1
                state.global_step += 1
                state.losses.setdefault(phase.name, []).append(value)
                bar.set_postfix(loss=f"{value:.4f}")
                if hooks.on_step:
                    hooks.on_step(epoch, phase.name, steps, value)
            epoch_losses[phase.name] = total / max(steps, 1)
        if hooks.on_epoch_end:
            hooks.on_epoch_end(epoch, epoch_losses)
    return state
