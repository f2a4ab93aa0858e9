"""Fisher forgetting (Golatkar et al., CVPR 2020, "Eternal Sunshine of the Spotless Net"), as the SCRUB
authors' code runs it (their ``hessian`` + ``get_mean_var``): no training, one perturbation of the
weights with Gaussian noise shaped by the retain set's diagonal Fisher, so that weights the retain set
does not pin down (large variance) are scrambled and those it needs are kept.

1. Diagonal Fisher of D_r: ``F = mean_x sum_y p(y|x) * (d CE(x, y) / d theta)^2`` (the true Fisher, labels
   drawn from the model). Per-example gradients come from ``torch.func`` (``functional_call`` + ``vmap`` +
   ``grad``), ``chunk_size`` examples at a time, one vmapped backward per class ``y``.
2. Per parameter tensor (authors' order: clamp, then scale by alpha):
   ``var = alpha * min(1 / (F + 1e-8), 1e3)`` (``1e2`` instead of ``1e3`` for the head); tensors with
   ndim > 1 take the mean of ``var`` over dim 1 (keepdim, expanded back); head and 1-d tensors (BatchNorm
   and conv biases) get ``var * 10``; then ``theta <- theta + sqrt(var) * N(0, 1)``.
3. Under class unlearning (``forget.kind=class``) the forgotten classes' head rows (weight row and bias)
   are replaced by ``0 + sqrt(1e-4 * 10) * N(0, 1)``, as the authors do (``forget_class_head``).

The head is the last block of ``engine.methods.blocks`` (the final Linear), where the authors test
``p.size(0) == num_classes``; the two agree on the engine's networks, without the authors' risk of
matching a layer that merely has num_classes channels.

Cost: the Fisher needs |D_r| x num_labels per-example backward passes, so its time grows as
|D_r| x num_labels x (one backward), and its memory as ``chunk_size`` x number of parameters (one
per-example gradient per row of a chunk, float32). Measured on one CPU thread (32x32 images): ~3-4 s per
100 retain examples for the integration tests' model (preact_resnet18, width 0.25, 3 classes, 0.71 M
parameters), ~10-15 s per 100 with 10 classes at width 0.25, ~170 s per 100 at width 1 (11 M parameters,
10 classes). So on a CPU it is feasible up to a few thousand retain examples at width 0.25 and stops
being feasible at CIFAR-10 scale (36k retain examples: ~1-1.5 h at width 0.25, ~17 h at width 1); a GPU
divides that by its speed-up but keeps the |D_r| x classes scaling (CIFAR-100 is 10x CIFAR-10 per
example). A chunk of 32 at width 1 holds ~1.4 GB of per-example gradients.

``epochs`` is fixed to 1: the loop then runs no step and (with ``eval.every_epoch``) records the perturbed
model as epoch 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call, grad, vmap

from engine.methods.base import Method, MethodContext, OptimizerSettings, Phase
from engine.methods.blocks import head_parameter_names
from engine.methods.losses import _upcast

FORGOTTEN_CLASS_VAR = 1e-4  # the authors' variance of a forgotten class's head row (before the x10)


class FisherConfig(OptimizerSettings):
    """alpha defaults to 1e-6 (the value the authors' notebooks pass; their ``get_mean_var`` default is 3e-6)."""

    name: Literal["fisher"] = Field("fisher", description="Method name.")
    alpha: float = Field(
        1e-6,
        gt=0,
        description="Noise scale: var = alpha * clamp(1 / (F + 1e-8), max=1e3 (1e2 for the head)).",
    )
    chunk_size: int = Field(
        32, ge=1, description="Examples per vmapped per-example-gradient chunk (memory: chunk_size x params)."
    )
    batch_size: int = Field(256, ge=1, description="Retain examples fetched at a time for the Fisher.")
    forget_class_head: bool = Field(
        True,
        description="Under class unlearning, centre the forgotten classes' head rows at 0 with variance 1e-4 "
        "(x10), as the authors do. Ignored for other forget kinds.",
    )
    epochs: int = Field(
        1, ge=1, le=1, description="Fixed at 1: no training; epoch 1 only records the perturbed model."
    )


class _Forward(nn.Module):
    """Wraps ``forward(model, batch)`` so that ``functional_call`` can swap the model's tensors."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, dict], torch.Tensor]):
        super().__init__()
        self.model, self.fn = model, forward

    def forward(self, batch: dict) -> torch.Tensor:
        return self.fn(self.model, batch)


def fisher_diagonal(
    model: nn.Module,
    forward: Callable[[nn.Module, dict], torch.Tensor],
    batches: Iterable[dict],
    chunk_size: int = 32,
) -> dict[str, torch.Tensor]:
    """``{name: mean over examples of sum_y p(y|x) * grad CE(x, y)^2}`` for every parameter.

    Eval mode: BatchNorm must use its running statistics so that each example's gradient is its own
    (batch statistics would couple the rows of a chunk) and dropout is off, as in the authors' code.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wrapper = _Forward(model, forward)
    params = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
    buffers = {f"model.{n}": b for n, b in model.named_buffers()}

    def ce(p: dict, example: dict, y: torch.Tensor) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in example.items()}
        logits = functional_call(wrapper, {**p, **buffers}, (one,))
        return F.cross_entropy(_upcast(logits), y.unsqueeze(0))

    per_example_grad = vmap(grad(ce), in_dims=(None, 0, 0))
    # accumulated in at least float32 whatever the weights' dtype
    total = {
        n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for n, p in params.items()
    }
    count = 0
    for batch in batches:
        n = int(batch["pixel_values"].shape[0])
        tensors = {
            k: v.to(device) for k, v in batch.items() if torch.is_tensor(v) and v.ndim and v.shape[0] == n
        }
        tensors.pop("labels", None)  # the Fisher's labels are every class, weighted by the model
        for start in range(0, n, chunk_size):
            chunk = {k: v[start : start + chunk_size] for k, v in tensors.items()}
            with torch.no_grad():
                probs = F.softmax(_upcast(forward(model, chunk)), dim=-1)
            m, num_labels = probs.shape
            for y in range(num_labels):
                grads = per_example_grad(params, chunk, torch.full((m,), y, device=device))
                w = probs[:, y]
                for name, g in grads.items():
                    g = g.to(total[name].dtype)
                    total[name] += (w.to(g.dtype).view(-1, *[1] * (g.ndim - 1)) * g.pow(2)).sum(0)
        count += n
    model.train(was_training)
    return {name[len("model.") :]: t / max(count, 1) for name, t in total.items()}


def fisher_mean_var(
    param: torch.Tensor,
    fisher: torch.Tensor,
    alpha: float,
    is_head: bool,
    forget_rows: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' ``get_mean_var``: the mean and variance of a tensor's Gaussian (module docstring)."""
    var = (1.0 / (fisher + 1e-8)).clamp(max=1e3)
    if is_head:
        var = var.clamp(max=1e2)
    var = alpha * var
    if param.ndim > 1:
        var = var.mean(dim=1, keepdim=True).expand_as(param).clone()
    mu = param.detach().clone()
    if is_head and forget_rows:
        mu[forget_rows] = 0.0
        var[forget_rows] = FORGOTTEN_CLASS_VAR
    if is_head or param.ndim == 1:
        var = var * 10
    return mu, var


class Fisher(Method):
    """Runs entirely in ``prepare``; ``phases`` is empty. ``variance`` keeps, after ``prepare``, the
    variance each parameter's noise was drawn with ({name: tensor}, on the device)."""

    needs_teacher = False
    needs = ("classifier_head",)  # a Fisher information per class, and class unlearning's head rows
    prepares_student = True

    def __init__(self, config: FisherConfig):
        self.config = config
        self.variance: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def prepare(self, student, ctx: MethodContext) -> None:
        c = self.config
        student.to(ctx.device)
        with torch.enable_grad():
            fisher = fisher_diagonal(student, ctx.forward, ctx.retain_batches(c.batch_size), c.chunk_size)
        head = head_parameter_names(student)
        forget_rows = list(ctx.forget_classes or []) if c.forget_class_head else []
        for name, p in student.named_parameters():
            mu, var = fisher_mean_var(p, fisher[name], c.alpha, name in head, forget_rows)
            p.copy_(mu + var.sqrt() * torch.randn_like(p))
            self.variance[name] = var

    def phases(self, epoch: int) -> list[Phase]:
        return []

    def loss(self, phase, student_logits, teacher_logits, labels, batch=None):
        raise ValueError(
            "Fisher forgetting has no training phases: it perturbs the weights once in prepare()"
        )
