"""Pure tensor maths for the methods. Every function returns a SUM over examples so the caller
chooses the normaliser (see ``LossTerms``); dividing by the batch size gives PyTorch's
``reduction="batchmean"`` / ``"mean"``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # at least float32 for softmaxes whatever the compute dtype: bf16/fp16 log-probabilities are too coarse.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@dataclass
class TopKLogits:
    """A cached teacher's outputs for causal LMs whose full logits are too large to keep (engine/teacher_cache.py):
    per row (answer token) the ``k`` largest logits ``values`` and their vocabulary ``indices``, and
    ``lse`` = logsumexp(logits / temperature) over the WHOLE vocabulary, so the teacher's probabilities of the
    top k are exact and the rest of its mass is one tail bucket."""

    values: torch.Tensor  # [n, k] raw logits
    indices: torch.Tensor  # [n, k] vocabulary ids
    lse: torch.Tensor  # [n] logsumexp(logits / temperature)
    temperature: float

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def __getitem__(self, rows: slice) -> TopKLogits:
        return TopKLogits(self.values[rows], self.indices[rows], self.lse[rows], self.temperature)

    def to(self, device) -> TopKLogits:
        return TopKLogits(
            self.values.to(device), self.indices.to(device), self.lse.to(device), self.temperature
        )

    def log_probs(self) -> torch.Tensor:
        """[n, k] the teacher's exact log-probabilities of its top-k tokens at ``temperature``."""
        return self.values.float() / self.temperature - self.lse.float().unsqueeze(1)

    def tail_mass(self) -> torch.Tensor:
        """[n] the teacher's probability outside its top k (0 when k covers the vocabulary)."""
        return (1 - self.log_probs().exp().sum(1)).clamp(min=0)


@dataclass
class TeacherProbs:
    """A cached teacher's full outputs (engine/teacher_cache.py): per row its probabilities at ``temperature`` and
    ``neg_entropy`` = sum p log p. The divergence is then a soft-target cross-entropy plus that constant:
    KL(p || q) = -sum p log q + sum p log p, one fused torch kernel instead of a teacher softmax, a log and
    kl_div's elementwise graph every step (benchmarks/scale.py: the SCRUB step's extra cost is this loss)."""

    probs: torch.Tensor  # [n, C] softmax(logits / temperature)
    neg_entropy: torch.Tensor  # [n] sum p log p
    temperature: float

    @property
    def shape(self) -> torch.Size:
        return self.probs.shape

    def __getitem__(self, rows: slice) -> TeacherProbs:
        return TeacherProbs(self.probs[rows], self.neg_entropy[rows], self.temperature)

    def to(self, device) -> TeacherProbs:
        return TeacherProbs(self.probs.to(device), self.neg_entropy.to(device), self.temperature)


def _zero(x: torch.Tensor) -> torch.Tensor:
    # a scalar in the upcast dtype, without upcasting (copying) the whole tensor first
    return x.new_zeros((), dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)


def _kl_rows(student_logits: torch.Tensor, teacher_logits, t: float) -> torch.Tensor:
    if isinstance(teacher_logits, TopKLogits):
        return _kl_rows_topk(student_logits, teacher_logits, t)
    if isinstance(teacher_logits, TeacherProbs):
        if teacher_logits.temperature != t:
            raise ValueError(
                f"cached teacher outputs are at temperature {teacher_logits.temperature}, not {t}"
            )
        soft_ce = F.cross_entropy(_upcast(student_logits) / t, teacher_logits.probs, reduction="sum")
        return soft_ce + teacher_logits.neg_entropy.sum()
    log_p_student = F.log_softmax(_upcast(student_logits) / t, dim=-1)
    p_teacher = F.softmax(_upcast(teacher_logits) / t, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="sum")


def _kl_rows_topk(student_logits: torch.Tensor, teacher: TopKLogits, t: float) -> torch.Tensor:
    """KL between the teacher and the student coarsened to k + 1 buckets (the teacher's top k tokens and one
    tail bucket of the rest): sum_top p (log p - log q) + p_tail (log p_tail - log q_tail). Exact when the
    tail mass is 0; otherwise at most the full KL (coarsening never increases a divergence)."""
    if teacher.temperature != t:
        raise ValueError(
            f"cached teacher outputs are at temperature {teacher.temperature}, the loss asks {t}"
        )
    scaled = _upcast(student_logits) / t
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    indices = teacher.indices.long()
    log_p_top = teacher.log_probs()
    p_top = log_p_top.exp()
    top = (p_top * (log_p_top - (scaled.gather(1, indices) - log_norm))).sum()
    if indices.shape[1] >= scaled.shape[1]:
        return top  # k covers the vocabulary: no tail, the exact divergence
    # the student's tail: logsumexp over the tokens outside the teacher's top k (clamped: a student with no
    # mass left there must give a finite term, as 0 * log 0 does)
    log_q_tail = torch.logsumexp(scaled.scatter(1, indices, float("-inf")), dim=-1) - log_norm[:, 0]
    p_tail = (1 - p_top.sum(1)).clamp(min=0)
    tail = (p_tail * (p_tail.clamp(min=1e-30).log() - log_q_tail.clamp(min=-1e4))).sum()
    return top + tail


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
    total = _zero(student_logits)
    for i in range(0, n, chunk_rows):
        s, te = student_logits[i : i + chunk_rows], teacher_logits[i : i + chunk_rows]
        if s.requires_grad:
            total = total + checkpoint(_kl_rows, s, te, t, use_reentrant=False)
        else:
            total = total + _kl_rows(s, te, t)
    return total * (t * t)


def _ce_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_upcast(logits), labels, reduction="sum")


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Sum over rows of the cross-entropy on raw logits (no temperature). With ``chunk_rows``, chunked as
    ``distill_kl_sum``: at most ``chunk_rows x vocab`` float32 values at once (a 128k vocabulary over a long
    batch of bf16 logits must not become one fp32 [tokens, vocab] tensor), each chunk recomputed in backward."""
    n = logits.shape[0]
    if not chunk_rows or n <= chunk_rows:
        return _ce_rows(logits, labels)
    total = _zero(logits)
    for i in range(0, n, chunk_rows):
        s, y = logits[i : i + chunk_rows], labels[i : i + chunk_rows]
        total = total + (
            checkpoint(_ce_rows, s, y, use_reentrant=False) if s.requires_grad else _ce_rows(s, y)
        )
    return total


def kl_and_ce_sum(
    student_logits: torch.Tensor,
    teacher: TeacherProbs,
    labels: torch.Tensor,
    kl_weight: float,
    ce_weight: float,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``kl_weight * distill_kl_sum + ce_weight * cross_entropy_sum`` at temperature 1 (non-negative weights),
    in ONE soft-target cross-entropy: both terms are -sum w log q over the student's log-probabilities q, so
    the sum is -sum (kl_weight p + ce_weight onehot(label)) log q + kl_weight sum p log p. One log-softmax of
    the vocabulary per row instead of two (benchmarks/scale.py: a SCRUB step then costs about a fine-tuning
    step). Chunked like ``distill_kl_sum``."""
    if teacher.temperature != 1:
        raise ValueError("kl_and_ce_sum fuses the two terms at temperature 1 only")

    def rows(s: torch.Tensor, probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = probs * kl_weight
        target.index_put_(
            (torch.arange(len(y), device=y.device), y), target.new_tensor(ce_weight), accumulate=True
        )
        return F.cross_entropy(_upcast(s), target, reduction="sum")

    n = student_logits.shape[0]
    step = chunk_rows or max(n, 1)
    total = _zero(student_logits)
    for i in range(0, n, step):
        s, probs, y = student_logits[i : i + step], teacher.probs[i : i + step], labels[i : i + step]
        total = total + (
            checkpoint(rows, s, probs, y, use_reentrant=False) if s.requires_grad else rows(s, probs, y)
        )
    return total + kl_weight * teacher.neg_entropy.sum()


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


def simnpo_sum(nll: torch.Tensor, lengths: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    """Sum over sequences of SimNPO's forget loss (Fan et al. 2024), reference-free and length-normalised:
    -2/beta * log sigmoid(beta * (nll / |y| - delta)) = -2/beta * log sigmoid(-(beta/|y|) log pi(y|x) - beta delta),
    with ``nll`` = -log pi(y|x) of each whole answer and ``lengths`` = |y| its counted tokens. The form of the
    authors' code and open-unlearning's ``SimNPO`` (src/trainer/unlearn/simnpo.py): the margin ``delta`` is
    inside the beta factor, so the paper's gamma is beta * delta."""
    per_token = nll / lengths.to(nll.dtype).clamp(min=1)
    return (-2.0 / beta * F.logsigmoid(beta * (per_token - delta))).sum()


def undial_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """Sum over rows (answer tokens) of UNDIAL's self-distillation loss (Dong et al. 2024; open-unlearning's
    ``compute_undial_loss``): the cross-entropy of the student against the teacher's distribution with the label
    token's logit lowered by ``beta``, -sum_v softmax(t - beta * onehot(y))_v * log softmax(s)_v. The target
    is fixed (no gradient reaches the teacher)."""
    adjusted = _upcast(teacher_logits.detach()).clone()
    rows = torch.arange(len(labels), device=labels.device)
    adjusted[rows, labels] -= beta
    return F.cross_entropy(_upcast(student_logits), F.softmax(adjusted, dim=-1), reduction="sum")


def dpo_sum(
    win_nll: torch.Tensor,
    win_ref_nll: torch.Tensor,
    lose_nll: torch.Tensor,
    lose_ref_nll: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Sum over preference pairs of DPO's loss (Rafailov et al. 2023) as open-unlearning scales it
    (``compute_dpo_loss``: times 2/beta, as NPO): -2/beta * log sigmoid(beta * (log pi(y_w)/pi_ref(y_w) -
    log pi(y_l)/pi_ref(y_l))), each log pi = -nll of a whole answer; 2/beta * log 2 per pair where the student
    is the reference."""
    win_ratio = win_ref_nll - win_nll  # log pi_theta(y_w|x) - log pi_ref(y_w|x)
    lose_ratio = lose_ref_nll - lose_nll
    return (-2.0 / beta * F.logsigmoid(beta * (win_ratio - lose_ratio))).sum()


def activation_mse_sum(states: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over sequences of each sequence's mean, over its ``mask``ed positions, of ||states - target||^2 / H
    (RMU; open-unlearning's ``compute_activation_loss`` before its mean over the batch: the squared error's mean
    over the hidden size, summed over a sequence's masked tokens, over their count). ``states`` [B, S, H],
    ``target`` broadcastable to it (the control vector c*u [H], or the frozen model's states), ``mask`` [B, S]
    bool; a sequence with no masked position adds 0."""
    per_token = (_upcast(states) - _upcast(target)).pow(2).mean(-1)  # [B, S]
    m = mask.to(per_token.dtype)
    return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum()
