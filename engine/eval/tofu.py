"""TOFU evaluation with open-unlearning's definitions and key names (locuslab/open-unlearning), so the
numbers this engine reports can be compared with theirs.

Where each definition comes from (paths in locuslab/open-unlearning):

- probability: ``src/evals/metrics/utils.py::evaluate_probability``: exp(-mean NLL of the answer tokens).
- truth ratio: ``src/evals/metrics/memorization.py::truth_ratio``: wrong / correct, where wrong =
  exp(-mean over perturbed answers of their mean NLL) and correct = exp(-mean NLL of the correct answer).
  ``configs/eval/tofu_metrics/forget_Truth_Ratio.yaml`` (key ``forget_truth_ratio``): correct =
  paraphrased answer, aggregator ``closer_to_1_better``; ``retain_Truth_Ratio`` likewise with
  ``true_better``; ``ra_Truth_Ratio`` / ``wf_Truth_Ratio``: correct = ``answer``, ``true_better``.
- normalised probability: ``memorization.py::probability_w_options`` (``ra/wf_Q_A_Prob_normalised``).
- ROUGE: ``utils.py::eval_text_similarity``: rouge_score rougeL recall, ``use_stemmer=True``, greedy
  generation of ``configs/generation/default.yaml`` (do_sample False, max_new_tokens 64), left padding.
- model utility: ``src/evals/metrics/utility.py::hm_aggregate``: harmonic mean of the 9 utility numbers.
- forget quality: ``src/evals/metrics/privacy.py::ks_test``: KS 2-sample p-value between the forget
  truth ratios of this model and of the retain-only model; None without the retain model's logs.
- MIA: ``src/evals/metrics/mia/{loss,zlib,min_k,min_k_plus_plus,utils}.py``, forget vs holdout, k=0.4
  (``configs/eval/tofu_metrics/mia_min_k*.yaml``). Scores are "higher = less likely a member" and
  ``mia_auc`` labels forget 0, holdout 1, so AUC -> 1 when the model knows the forget set better.
- exact memorization and extraction strength: ``memorization.py::exact_memorization`` and
  ``::extraction_strength`` on the forget answers (engine/eval/memorization.py), from the forward that scores them.
- privleak: ``privacy.py::privleak`` on ``mia_min_k``: ((1-auc) - (1-ref)) / (1-ref + 1e-10) * 100 with
  ref = the retain model's ``mia_min_k`` AUC, or ``ref_value`` 0.5 without it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.data.text import QAFormatter
from engine.data.tofu import TofuData
from engine.eval.memorization import EM, ES, mean_of
from engine.eval.registry import METRICS
from engine.eval.scoring import eval_mode, generate_answers, score_answers

if TYPE_CHECKING:
    from engine.backends.base import Backend

EPS = 1e-10  # the epsilon open-unlearning adds in truth ratio, normalised probability and privleak
MIA_K = 0.4  # k of mia_min_k.yaml and mia_min_k_plus_plus.yaml (the attack classes default to 0.2)
PRIVLEAK_REF_AUC = 0.5  # privleak's ref_value when no retain-model logs are given
UTILITY_KEYS = METRICS["model_utility"].depends  # its pre_compute list (engine/eval/registry.py)
TRUTH_RATIO_KEY = {
    "forget": "forget_truth_ratio",
    "retain": "retain_Truth_Ratio",
    "ra": "ra_Truth_Ratio",
    "wf": "wf_Truth_Ratio",
}


# ---- pure helpers (numbers in, numbers out) ----------------------------------------------------------


def truth_ratios(correct_nll: Sequence[float], wrong_nll: Sequence[Sequence[float]]) -> np.ndarray:
    """Per example wrong_prob / (correct_prob + 1e-10), wrong_prob = exp(-mean_j nll_j) over the wrong
    answers (``memorization.py::truth_ratio`` averages the avg losses, then exponentiates)."""
    correct = np.exp(-np.asarray(correct_nll, dtype=np.float64))
    wrong = np.exp(-np.array([np.mean(w) for w in wrong_nll], dtype=np.float64))
    return wrong / (correct + EPS)


def closer_to_1_better(tr: Sequence[float]) -> float:
    """Forget set: best when true and false answers are equally likely: mean of min(tr, 1/tr)."""
    tr = np.asarray(tr, dtype=np.float64)
    return float(np.mean(np.minimum(tr, 1 / (tr + EPS))))


def true_better(tr: Sequence[float]) -> float:
    """Retain / real authors / world facts: best when the true answer wins: mean of max(0, 1 - tr)."""
    return float(np.mean(np.maximum(0.0, 1 - np.asarray(tr, dtype=np.float64))))


def normalised_probability(correct_nll: Sequence[float], wrong_nll: Sequence[Sequence[float]]) -> np.ndarray:
    """Per example p(correct) / (p(correct) + sum_j p(wrong_j) + 1e-10) (``probability_w_options``)."""
    correct = np.exp(-np.asarray(correct_nll, dtype=np.float64))
    wrong = np.array([np.exp(-np.asarray(w, dtype=np.float64)).sum() for w in wrong_nll])
    return correct / (correct + wrong + EPS)


def hmean(values: Sequence[float]) -> float:
    """Harmonic mean, 0 when any value is 0 (what ``scipy.stats.hmean`` in ``hm_aggregate`` returns)."""
    v = np.asarray(values, dtype=np.float64)
    return 0.0 if np.any(v == 0) else float(len(v) / np.sum(1 / v))


def ks_pvalue(model_tr: Sequence[float], reference_tr: Sequence[float]) -> float:
    """Forget quality: ``scipy.stats.ks_2samp(model, reference).pvalue`` (``privacy.py::ks_test``)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(model_tr), np.asarray(reference_tr)).pvalue)


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """ROC AUC with forget labelled 0 and holdout 1 over "higher = non-member" scores
    (``mia/utils.py::mia_auc``): 1 when every forget example looks more familiar than every holdout one."""
    from sklearn.metrics import roc_auc_score

    labels = [0] * len(forget_scores) + [1] * len(holdout_scores)
    return float(roc_auc_score(labels, list(forget_scores) + list(holdout_scores)))


def privleak(auc: float, ref_auc: float = PRIVLEAK_REF_AUC) -> float:
    """``privacy.py::privleak``: relative gap of (1 - AUC) to the reference's, in percent."""
    score, ref = 1 - auc, 1 - ref_auc
    return float((score - ref) / (ref + EPS) * 100)


def membership(forget_scored: Sequence[dict], holdout_scored: Sequence[dict], reference: dict | None):
    """The membership attacks every language-model suite shares: each attack's AUC of the forget rows (members)
    against the holdout rows (never trained on), and privleak on Min-K% against the reference model's AUC (0.5
    without one). Returns (metrics, per-example entries, the reference's own AUC or None)."""
    res, scores = {}, {}
    for name, attack in MIA_ATTACKS.items():
        f_scores, h_scores = [attack(s) for s in forget_scored], [attack(s) for s in holdout_scored]
        res[name] = mia_auc(f_scores, h_scores)
        scores[name] = {"forget": f_scores, "holdout": h_scores}
    given = reference.get("mia_min_k") if reference else None
    ref_auc = PRIVLEAK_REF_AUC if given is None else float(given)
    res["privleak"] = privleak(res["mia_min_k"], ref_auc)
    return res, {"mia_scores": scores, "privleak_reference_auc": ref_auc}, given


def min_k_score(logp: Sequence[float], k: float = MIA_K) -> float:
    """Min-K%: minus the mean of the lowest k fraction of token log-probs (at least one token)."""
    lp = np.sort(np.asarray(logp, dtype=np.float64))
    if lp.size == 0:
        return 0.0
    return float(-np.mean(lp[: max(1, int(len(lp) * k))]))


def min_k_plus_plus_score(
    logp: Sequence[float], mu: Sequence[float], var: Sequence[float], k: float = MIA_K
) -> float:
    """Min-K%++: the same on (log p(token) - mu) / sigma, where mu and sigma^2 are the mean and variance
    of log p under the model's own next-token distribution at that position (variance clamped at 1e-6)."""
    lp = np.asarray(logp, dtype=np.float64)
    if lp.size == 0:
        return 0.0
    z = (lp - np.asarray(mu, dtype=np.float64)) / np.sqrt(np.maximum(np.asarray(var, dtype=np.float64), 1e-6))
    return min_k_score(z, k)


def zlib_score(avg_nll: float, text: str) -> float:
    """zlib attack: the answer's mean NLL over the zlib-compressed byte length of its decoded text."""
    return float(avg_nll / len(zlib.compress(text.encode("utf-8"))))


def rouge_l_recall(generations: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each generation against its reference (``scorer.score(target, prediction)``)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, gen)["rougeL"].recall for gen, ref in zip(generations, references, strict=True)]


# ---- the benchmark -----------------------------------------------------------------------------------

MIA_ATTACKS: dict[str, Callable[[dict], float]] = {
    "mia_loss": lambda s: s["avg_nll"],
    "mia_zlib": lambda s: zlib_score(s["avg_nll"], s["text"]),
    "mia_min_k": lambda s: min_k_score(s["logp"], MIA_K),
    "mia_min_k_plus_plus": lambda s: min_k_plus_plus_score(s["logp"], s["mu"], s["var"], MIA_K),
}


def evaluate_tofu(model, tokenizer, formatter: QAFormatter, data: TofuData, *, batch_size: int = 16,
                  max_new_tokens: int = 64, device: str | torch.device = "cpu", reference: dict | None = None,
                  progress: bool = False, backend: Backend | None = None) -> dict:  # fmt: skip
    """Every TOFU number of open-unlearning's ``configs/eval/tofu.yaml`` that needs no extra model, under
    its key, as floats; ``per_example`` holds the per-example values (keyed by example id as a string).

    ``reference``: this function's result for the retain-only model. With it, ``forget_quality`` (KS
    p-value) and ``privleak`` compare against it; without it forget_quality is None and privleak uses
    the reference AUC 0.5. The model must already be on ``device``. ``tokenizer`` must be the one the
    formatter encodes with (encoding, generation and decoding all go through ``formatter.tokenizer``).

    ``backend`` (several ranks): every scoring and generation pass is split by rank and gathered, so each
    rank runs about 1/world_size of the forwards; the numbers are then computed from the full per-example
    lists on every rank, identical to one process's (engine/eval/shard.py)."""
    kw = {"batch_size": batch_size, "device": device, "progress": progress, "backend": backend}
    res: dict = {}
    per: dict = {}

    def nll(rows: list[dict], key: str, **extra) -> list[dict]:
        return score_answers(model, formatter, [(r["question"], r[key]) for r in rows], **kw, **extra)

    def options_nll(rows: list[dict]) -> list[np.ndarray]:
        """Mean NLL of each perturbed (wrong) answer, one array per example."""
        flat = [(r["question"], a) for r in rows for a in r["perturbed_answer"]]
        scores = [s["avg_nll"] for s in score_answers(model, formatter, flat, **kw)]
        bounds = np.cumsum([0] + [len(r["perturbed_answer"]) for r in rows])
        return [np.array(scores[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    splits = (
        ("forget", data.forget_eval),
        ("retain", data.retain_eval),
        ("ra", data.real_authors),
        ("wf", data.world_facts),
    )
    forget_scored: list[dict] = []
    with eval_mode(model):
        for prefix, rows in splits:
            # forget answers also feed the MIA attacks, so they carry token statistics
            scored = nll(rows, "answer", token_stats=prefix == "forget")
            answer_nll = np.array([s["avg_nll"] for s in scored])
            wrong_nll = options_nll(rows)
            res[f"{prefix}_Q_A_Prob"] = float(np.mean(np.exp(-answer_nll)))
            res[f"{prefix}_Q_A_PERT_Prob"] = float(np.mean([np.mean(np.exp(-w)) for w in wrong_nll]))
            if prefix in ("forget", "retain"):  # TOFU authors: the paraphrase is the "correct" answer
                correct_nll = np.array([s["avg_nll"] for s in nll(rows, "paraphrased_answer")])
                res[f"{prefix}_Q_A_PARA_Prob"] = float(np.mean(np.exp(-correct_nll)))
            else:  # real authors / world facts: the answer itself, normalised against the options
                correct_nll = answer_nll
                res[f"{prefix}_Q_A_Prob_normalised"] = float(
                    np.mean(normalised_probability(answer_nll, wrong_nll))
                )
            tr = truth_ratios(correct_nll, wrong_nll)
            aggregate = closer_to_1_better if prefix == "forget" else true_better
            res[TRUTH_RATIO_KEY[prefix]] = aggregate(tr)
            gens = generate_answers(
                model, formatter, [r["question"] for r in rows], max_new_tokens=max_new_tokens, **kw
            )
            rouge = rouge_l_recall(gens, [r["answer"].strip() for r in rows])
            res[f"{prefix}_Q_A_ROUGE"] = float(np.mean(rouge))
            if prefix == "forget":
                ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
                per["forget_truth_ratio_by_id"] = dict(zip(ids, tr.tolist()))
                per["forget_Q_A_Prob_by_id"] = dict(zip(ids, np.exp(-answer_nll).tolist()))
                per["forget_Q_A_ROUGE_by_id"] = dict(zip(ids, rouge))
                for key in (ES, EM):  # the forget answers' own forward gave them (score_encoded)
                    res[key] = mean_of(scored, key)
                    per[f"{key}_by_id"] = {i: s[key] for i, s in zip(ids, scored, strict=True)}
                forget_scored = scored
        res["model_utility"] = hmean([res[k] for k in UTILITY_KEYS])

        # Membership inference: forget answers (members) against holdout authors (never trained on).
        holdout_scored = nll(data.holdout, "answer", token_stats=True)
    attacks, attack_per, _ = membership(forget_scored, holdout_scored, reference)
    res.update(attacks)
    per.update(attack_per, mia_auc={name: res[name] for name in MIA_ATTACKS})
    if reference:
        ref_tr = list(reference["per_example"]["forget_truth_ratio_by_id"].values())
        res["forget_quality"] = ks_pvalue(list(per["forget_truth_ratio_by_id"].values()), ref_tr)
    else:
        res["forget_quality"] = None
    res["per_example"] = per
    return res
