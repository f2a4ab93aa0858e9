"""Pure tensor maths for the methods. Every function returns a SUM over examples so the caller
chooses the normaliser (see ``LossTerms``); dividing by the batch size gives PyTorch's
``reduction="batchmean"`` / ``"mean"``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # at least float32 for softmaxes whatever the compute dtype: bf16/fp16 log-probabilities are too coarse.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    log_p_student = F.log_softmax(_upcast(student_logits) / t, dim=-1)
    p_teacher = F.softmax(_upcast(teacher_logits) / t, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="sum")


def distill_kl_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Sum over rows of T^2 * KL(softmax(t/T) || softmax(s/T)) (docs/algorithm.md, "The two kinds of step").

    The teacher is the target distribution (forward KL, as in Hinton's distillation); the T^2 factor
    keeps gradient magnitudes comparable across temperatures. Rows are examples for a classifier and
    answer tokens for a causal LM. With ``chunk_rows``, at most ``chunk_rows x vocab`` float32
    probabilities exist at once: each chunk is recomputed in backward (activation checkpointing)
    instead of keeping every chunk's softmax alive for the whole batch.
    """
    t = float(temperature)
    n = student_logits.shape[0]
    if not chunk_rows or n <= chunk_rows:
        return _kl_rows(student_logits, teacher_logits, t) * (t * t)
    total = _upcast(student_logits).new_zeros(())
    for i in range(0, n, chunk_rows):
        s, te = student_logits[i : i + chunk_rows], teacher_logits[i : i + chunk_rows]
        if s.requires_grad:
            total = total + checkpoint(_kl_rows, s, te, t, use_reentrant=False)
        else:
            total = total + _kl_rows(s, te, t)
    return total * (t * t)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the cross-entropy on raw logits (no temperature)."""
    return F.cross_entropy(_upcast(logits), labels, reduction="sum")


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor, sequence: torch.Tensor, n: int) -> torch.Tensor:
    """Per sequence, the SUM of token NLLs ([n]); ``sequence`` maps each token row to its sequence
    (open-unlearning's ``compute_batch_nll``)."""
    nll = F.cross_entropy(_upcast(logits), labels, reduction="none")
    return nll.new_zeros(n).index_add(0, sequence, nll)


def npo_sum(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """Sum over sequences of NPO's forget loss -2/beta * log sigmoid(-beta * (log pi - log pi_ref))
    (Zhang et al. 2024; open-unlearning's ``compute_dpo_loss`` with only "lose" inputs), where
    log pi = -nll of the whole answer."""
    log_ratio = ref_nll - nll  # log pi_theta(y|x) - log pi_ref(y|x)
    return (-2.0 / beta * F.logsigmoid(-beta * log_ratio)).sum()


def parameter_distance(student: Iterable[torch.Tensor], original: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum over tensors of ||theta_student - theta_original||_F, norms NOT squared, as the paper-era
    code's optional penalty (docs/algorithm.md). Zero when the two parameter lists are equal."""
    terms = [torch.linalg.vector_norm(s - o.detach()) for s, o in zip(student, original, strict=True)]
    return torch.stack(terms).sum()
