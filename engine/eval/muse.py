"""MUSE's evaluation (Shi et al. 2024; the authors' code: github.com/swj0419/muse_bench, ``eval.py`` and
``metrics/``), under these keys:

- ``forget_verbmem_ROUGE`` (C1, no verbatim memorisation): ROUGE-L F1 of the greedy continuation (128 new tokens)
  of each ``verbmem`` prompt against its ground-truth continuation ``gt``;
- ``forget_knowmem_ROUGE`` (C2) and ``retain_knowmem_ROUGE`` (C4, utility): ROUGE-L F1 of the greedy answer
  (32 new tokens) to each question with MUSE's in-context examples in front, in MUSE's format
  (``knowmem_prompt``), the answer cut at the first blank line or next question as MUSE cuts it;
- ``privleak`` (C3): the Min-K% (k=0.4) AUC of the ``privleak`` forget articles against the holdout articles,
  with the formula of the TOFU suite (engine/eval/tofu.py: ``privleak``) against the reference (Retrain) model's
  AUC (0.5 without one); ``privleak_muse``: the paper's (AUC - AUC_ref) / AUC_ref * 100, where MUSE's AUC labels
  the forget rows as the negatives (1 - this engine's ``mia_min_k``), None without a reference. The two agree
  up to open-unlearning's epsilon: open-unlearning's privleak is MUSE's formula on 1 - AUC;
- ``mia_loss``, ``mia_zlib``, ``mia_min_k``, ``mia_min_k_plus_plus``: the TOFU suite's attacks on the same rows;
- ``extraction_strength`` and ``exact_memorization``: their means over the verbmem rows, each row's ground-truth
  continuation (at most 128 tokens) scored after its prompt (engine/eval/memorization.py, through
  engine/eval/scoring.py's ``score_encoded``).

ROUGE is rouge_score's ``rougeL`` with ``use_stemmer=True``, as the TOFU suite's recall. ``per_example`` holds
the per-row values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.data.muse import MuseData
from engine.data.text import IGNORE
from engine.eval.memorization import mean_of
from engine.eval.scoring import generate_from_ids, score_encoded
from engine.eval.tofu import membership

if TYPE_CHECKING:
    from engine.backends.base import Backend

VERBMEM_NEW_TOKENS, KNOWMEM_NEW_TOKENS = 128, 32  # MUSE's eval.py defaults
MEMORIZATION = ("extraction_strength", "exact_memorization")  # per row from score_encoded (memorization.py)
ANSWER_STOPS = ("\n\n", "\nQuestion", "Question:")  # metrics/knowmem.py cuts an answer at the first of these


def rouge_l_f1(generations: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each generation against its reference (``scorer.score(target, prediction).fmeasure``)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        scorer.score(ref, gen)["rougeL"].fmeasure for gen, ref in zip(generations, references, strict=True)
    ]


def knowmem_prompt(icl: Sequence[dict], question: str) -> str:
    """MUSE's few-shot prompt: each in-context pair as ``Question: Q\\nAnswer: A\\n\\n``, then the question, ending
    in ``Answer: `` (metrics/knowmem.py)."""
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    return shots + f"Question: {question}\nAnswer: "


def cut_answer(text: str) -> str:
    """The answer up to the first stop (MUSE's ``get_prefix_before_words_occur``), stripped."""
    for stop in ANSWER_STOPS:
        text = text.split(stop)[0]
    return text.strip()


def privleak_muse(auc: float, ref_auc: float) -> float | None:
    """The MUSE paper's privleak, (AUC - AUC_ref) / AUC_ref * 100, on MUSE's AUC: forget rows the negatives, so
    1 - ``auc`` and 1 - ``ref_auc`` (this engine's AUCs, which go to 1 as the forget rows look more familiar).
    Negative: the forget rows look more familiar to the model than to the reference (under-unlearning). None when
    the reference's MUSE AUC is 0 (every forget row more familiar to it than every holdout row): the ratio is then
    undefined (the paper's formula has no epsilon; ``privleak`` adds open-unlearning's)."""
    muse, ref = 1 - auc, 1 - ref_auc
    return None if ref == 0 else float((muse - ref) / ref * 100)


def _prompt_ids(tok, text: str, limit: int | None) -> list[int]:
    """``text`` tokenized as MUSE does (with the tokenizer's special tokens); at most its last ``limit`` tokens."""
    ids = tok(text, add_special_tokens=True)["input_ids"]
    return ids[-limit:] if limit else ids


def evaluate_muse(model, tokenizer, data: MuseData, *, batch_size: int = 16,
                  verbmem_max_new_tokens: int = VERBMEM_NEW_TOKENS, knowmem_max_new_tokens: int = KNOWMEM_NEW_TOKENS,
                  max_prompt_tokens: int | None = None, device: str | torch.device = "cpu",
                  reference: dict | None = None, progress: bool = False, backend: Backend | None = None) -> dict:  # fmt: skip
    """Every number above for ``model`` (already on ``device``) on ``data`` (engine/data/muse.py: MuseData).
    ``reference``: this function's result for the reference (Retrain) model, privleak's baseline AUC.
    ``max_prompt_tokens``: a prompt keeps its last N tokens (None: all of it). ``backend`` (several ranks): the
    scoring and the generations are split by rank and gathered, the numbers then computed from the full per-row
    lists as one process would (engine/eval/shard.py)."""
    tok = tokenizer
    kw = {"batch_size": batch_size, "device": device, "progress": progress, "backend": backend}
    res: dict = {}
    per: dict = {}

    # C1: verbatim memorisation
    prompts = [_prompt_ids(tok, r["prompt"], max_prompt_tokens) for r in data.verbmem]
    gens = generate_from_ids(model, tok, prompts, max_new_tokens=verbmem_max_new_tokens, **kw)
    verb = rouge_l_f1(gens, [str(r["gt"]) for r in data.verbmem])
    res["forget_verbmem_ROUGE"] = float(np.mean(verb)) if verb else None
    per["forget_verbmem_ROUGE_by_row"] = verb

    # C2 / C4: knowledge memorisation, with MUSE's in-context examples
    for key, rows, icl in (("forget_knowmem_ROUGE", data.knowmem_forget, data.knowmem_forget_icl),
                           ("retain_knowmem_ROUGE", data.knowmem_retain, data.knowmem_retain_icl)):  # fmt: skip
        prompts = [_prompt_ids(tok, knowmem_prompt(icl, r["question"]), max_prompt_tokens) for r in rows]
        answers = [
            cut_answer(g)
            for g in generate_from_ids(model, tok, prompts, max_new_tokens=knowmem_max_new_tokens, **kw)
        ]
        scores = rouge_l_f1(answers, [str(r["answer"]) for r in rows])
        res[key] = float(np.mean(scores)) if scores else None
        per[f"{key}_by_row"] = scores

    # C3: privacy leakage, and the attacks on the same rows (forget articles vs holdout articles)
    def documents(rows: list[dict]) -> list[dict]:
        return [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows]

    forget = score_encoded(model, tok, documents(data.privleak_forget), token_stats=True, **kw)
    holdout = score_encoded(model, tok, documents(data.privleak_holdout), token_stats=True, **kw)
    attacks, attack_per, ref_auc = membership(forget, holdout, reference)
    res.update(attacks)
    res["privleak_muse"] = None if ref_auc is None else privleak_muse(res["mia_min_k"], float(ref_auc))
    per.update(
        attack_per, privleak_reference_auc=ref_auc
    )  # None without a reference, as MUSE's has no default

    # extraction strength of each ground-truth continuation after its prompt (engine/eval/scoring.py's, if any)
    encoded = []
    for r, p in zip(data.verbmem, (_prompt_ids(tok, r["prompt"], max_prompt_tokens) for r in data.verbmem)):
        gt = tok(str(r["gt"]), add_special_tokens=False)["input_ids"][:verbmem_max_new_tokens]
        if gt:
            encoded.append({"input_ids": p + gt, "labels": [IGNORE] * len(p) + gt})
    scored = score_encoded(model, tok, encoded, **kw) if encoded else []
    for key in MEMORIZATION:
        res[key] = mean_of(scored, key)
        per[f"{key}_by_row"] = [s.get(key) for s in scored]
    res["per_example"] = per
    return res
