"""Pure tensor maths for the methods. Every function returns a SUM over examples so the caller
chooses the normaliser (see ``LossTerms``); dividing by the batch size gives PyTorch's
``reduction="batchmean"`` / ``"mean"``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def distill_kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Sum over rows of T^2 * KL(softmax(t/T) || softmax(s/T)) (SCRUB.md, "The divergence").

    The teacher is the target distribution (forward KL, as in Hinton's distillation); the T^2 factor
    keeps gradient magnitudes comparable across temperatures.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    p_teacher = F.softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="sum") * (t * t)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the cross-entropy on raw logits (no temperature)."""
    return F.cross_entropy(logits, labels, reduction="sum")


def parameter_distance(student: Iterable[torch.Tensor], original: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum over tensors of ||theta_student - theta_original||_F, norms NOT squared, as the paper-era
    code's optional penalty (SCRUB.md). Zero when the two parameter lists are equal."""
    terms = [torch.linalg.vector_norm(s - o.detach()) for s, o in zip(student, original, strict=True)]
    return torch.stack(terms).sum()
