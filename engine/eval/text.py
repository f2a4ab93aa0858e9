"""Evaluation of a causal LM on any text data (raw documents or prompt/answer pairs), with the field's
conventions: the MIA attacks and privleak are TOFU's (engine/eval/tofu.py: forget rows against holdout rows,
AUC -> 1 when the model knows the forget rows better; privleak on Min-K% against the reference model's AUC,
or 0.5 without one).

Keys: ``forget_nll``, ``retain_nll``, ``holdout_nll`` (mean NLL per counted token: every token of a
document, the answer tokens of a pair), ``forget_verbatim_rouge`` (ROUGE-L recall of the greedy
continuation of the first half of each forget row's counted tokens against its second half),
``extraction_strength`` and ``exact_memorization`` (open-unlearning's, engine/eval/memorization.py: means over
the forget rows, from the forward that scores them), ``mia_loss``, ``mia_zlib``, ``mia_min_k``,
``mia_min_k_plus_plus``, ``privleak``; the MIAs and privleak are None without a holdout set. ``per_example``
holds the per-row values by id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.data.text import IGNORE
from engine.eval.memorization import EM, ES, mean_of
from engine.eval.scoring import generate_from_ids, score_encoded
from engine.eval.tofu import MIA_ATTACKS, membership, rouge_l_recall

if TYPE_CHECKING:
    from engine.backends.base import Backend


def verbatim_split(encoded: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids) of an encoded row: the counted tokens cut in half; the prompt is
    everything before the second half (a pair's question included), the reference is the second half."""
    ids, labels = encoded["input_ids"], encoded["labels"]
    counted = [i for i in range(1, len(ids)) if labels[i] != IGNORE]  # positions the loss predicts
    if len(counted) < 2:
        return list(ids), []
    cut = counted[len(counted) // 2]
    return list(ids[:cut]), list(ids[cut : counted[-1] + 1])


def token_mean(scored: Sequence[dict]) -> float | None:
    tokens = sum(s["tokens"] for s in scored)
    return sum(s["avg_nll"] * s["tokens"] for s in scored) / tokens if tokens else None


def evaluate_text(model, formatter, data, *, batch_size: int = 16, max_new_tokens: int = 32,
                  max_rows: int | None = None, device: str | torch.device = "cpu", reference: dict | None = None,
                  progress: bool = False, backend: Backend | None = None) -> dict:  # fmt: skip
    """Every number above for ``model`` (already on ``device``) on ``data`` (engine/data/text.py: TextData),
    scoring at most ``max_rows`` rows of each set. ``reference``: this function's result for the reference
    model (privleak's baseline AUC). ``backend`` (several ranks): the scoring and the generations are split
    by rank and gathered, and the numbers computed from the full per-row lists as one process would
    (engine/eval/shard.py)."""
    tok = formatter.tokenizer
    kw = {"batch_size": batch_size, "device": device, "progress": progress, "backend": backend}

    def take(rows: list[dict]) -> list[dict]:
        return rows[:max_rows] if max_rows else rows

    def score(rows: list[dict], stats: bool = False) -> list[dict]:
        return score_encoded(
            model, tok, [formatter.encode_row(r) for r in take(rows)], token_stats=stats, **kw
        )

    forget, retain = score(data.forget, True), score(data.retain)
    holdout = score(data.holdout, True) if data.holdout else []
    res: dict = {
        "forget_nll": token_mean(forget),
        "retain_nll": token_mean(retain),
        "holdout_nll": token_mean(holdout),
    }

    rows = take(data.forget)
    splits = [verbatim_split(formatter.encode_row(r)) for r in rows]
    kept = [i for i, (_, ref) in enumerate(splits) if ref]
    gens = generate_from_ids(model, tok, [splits[i][0] for i in kept],
                             max_new_tokens=[min(max_new_tokens, len(splits[i][1])) for i in kept], **kw)  # fmt: skip
    refs = [tok.decode(splits[i][1], skip_special_tokens=True).strip() for i in kept]
    rouge = rouge_l_recall(gens, refs) if kept else []
    res["forget_verbatim_rouge"] = float(np.mean(rouge)) if rouge else None

    per: dict = {
        "forget_nll_by_id": {str(r["id"]): s["avg_nll"] for r, s in zip(rows, forget, strict=True)},
        "forget_verbatim_rouge_by_id": {str(rows[i]["id"]): v for i, v in zip(kept, rouge, strict=True)},
    }
    for key in (ES, EM):  # the forget rows' own forward gave them (score_encoded)
        res[key] = mean_of(forget, key)
        per[f"{key}_by_id"] = {str(r["id"]): s[key] for r, s in zip(rows, forget, strict=True)}
    if holdout:
        attacks, attack_per, _ = membership(forget, holdout, reference)
        res.update(attacks)
        per.update(attack_per)
    else:  # no non-members: no membership attack
        res.update({name: None for name in MIA_ATTACKS}, privleak=None)
    res["per_example"] = per
    return res
