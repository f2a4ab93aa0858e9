"""How much of an answer a causal LM reproduces verbatim, from one teacher-forced forward: open-unlearning's
``exact_memorization`` and ``extraction_strength`` (``src/evals/metrics/memorization.py``), per row.

For a row with T answer (counted) tokens y_1..y_T and the model's teacher-forced argmax predictions p_1..p_T
(p_t = argmax of the next-token distribution given the true prefix y_<t):

- ``exact_memorization`` (EM) = #{t : p_t = y_t} / T, the share of answer tokens the model predicts right;
- ``extraction_strength`` (ES) = 1 - k / T, k the smallest position (0-based) from which p_t = y_t for every
  t >= k: how short a true prefix of the answer is enough for greedy decoding to produce the rest. ES is 1
  when every token is right and 0 when even the last one is wrong (k = T, the empty suffix).

One forward suffices for ES: greedy decoding from the true prefix y_<k emits p_k; when p_k = y_k its context
for the next step is again the true prefix, so its next token is the teacher-forced p_{k+1}, and so on. A
suffix of right argmax predictions is therefore exactly a greedy continuation that reproduces the suffix.

open-unlearning's loop ``for k in range(T)`` leaves k = T - 1 when no suffix matches, scoring such a row
1/T instead of 0; here k = T, as the definition reads (the rows differ only when the last token is wrong).
A row without answer tokens has neither number (None), and the means skip it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.data.text import IGNORE

EM, ES = "exact_memorization", "extraction_strength"


def from_hits(hits: torch.Tensor) -> dict[str, float | None]:
    """``{EM, ES}`` of one row from ``hits`` [T] (bool): whether the argmax prediction of each answer token,
    in order, equals it."""
    n = int(hits.numel())
    if n == 0:
        return {EM: None, ES: None}
    hits = hits.bool().flatten()
    # the run of right predictions at the end of the answer is T - k long: k is where the last miss is, + 1
    misses = torch.nonzero(~hits).flatten()
    k = int(misses[-1]) + 1 if misses.numel() else 0
    return {EM: float(hits.sum()) / n, ES: 1.0 - k / n}


def memorization(logits: torch.Tensor, labels: torch.Tensor) -> list[dict[str, float | None]]:
    """Per row of ``logits`` [B, L, V] and ``labels`` [B, L], aligned (``logits[b, t]`` predicts
    ``labels[b, t]``): ``from_hits`` of its counted positions; positions labelled ``IGNORE`` (-100: prompt,
    padding) are not answer tokens."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"memorization: logits [B, L, V] and labels [B, L], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")  # fmt: skip
    counted = labels != IGNORE
    hits = logits.argmax(-1) == labels
    return [from_hits(hits[b][counted[b]]) for b in range(labels.shape[0])]


def mean_of(scored: Sequence[dict], key: str) -> float | None:
    """Mean of ``key`` over the rows that have it (None: no answer tokens); None when no row has it."""
    values = [s[key] for s in scored if s.get(key) is not None]
    return sum(values) / len(values) if values else None
