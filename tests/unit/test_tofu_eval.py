"""TOFU evaluation (engine.eval.tofu): open-unlearning's definitions against numbers computed by hand,
the scorers against the model's own logits, and the whole benchmark on a tiny Llama and real TOFU rows."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch

from engine.data.text import QAFormatter
from engine.data.tofu import TofuData
from engine.eval import tofu as T
from engine.testing import build_tiny_llama, build_tiny_tokenizer
from tests.conftest import TOFU

LN = math.log


def _rows(name: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (TOFU / f"{name}.jsonl").read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama + byte-level BPE tokenizer and a few rows of every TOFU evaluation set."""
    if not TOFU.exists():
        pytest.fail(f"TOFU not found at {TOFU}: the tests need ../shared/data beside the checkout")
    forget = _rows("forget10_perturbed", 4)
    for i, row in enumerate(forget):
        row["id"] = 3600 + i  # forget10 = the last 400 rows of full
    sets = {
        "forget": forget,
        "retain": _rows("retain_perturbed", 3),
        "ra": _rows("real_authors_perturbed", 3),
        "wf": _rows("world_facts_perturbed", 3),
        "holdout": _rows("holdout10", 4),
    }
    texts = []
    for rows in sets.values():
        for r in rows:
            texts += [
                r["question"],
                r["answer"],
                r.get("paraphrased_answer", ""),
                *r.get("perturbed_answer", []),
            ]
    tok = build_tiny_tokenizer(texts)
    model = build_tiny_llama(len(tok))
    fmt = QAFormatter(tok, max_length=512, chat_template="off")
    data = TofuData(
        "forget10",
        10,
        1,
        full=[],
        forget=forget,
        retain=[],
        holdout=sets["holdout"],
        forget_eval=forget,
        retain_eval=sets["retain"],
        real_authors=sets["ra"],
        world_facts=sets["wf"],
    )
    return model, tok, fmt, data


# ---- pure helpers against hand-computed numbers ------------------------------------------------------


def test_truth_ratio_uses_the_geometric_mean_of_wrong_answers_and_both_aggregators():
    # example 1: p(correct)=1/2, wrong NLLs ln2 and ln8 -> exp(-mean) = 1/4 (not the mean prob 5/16) -> 0.5
    # example 2: p(correct)=1/4, wrong p=1/2 -> 2;  example 3: equal -> 1
    tr = T.truth_ratios([LN(2), LN(4), LN(2)], [[LN(2), LN(8)], [LN(2)], [LN(2), LN(2)]])
    assert tr == pytest.approx([0.5, 2.0, 1.0], rel=1e-8)
    assert T.closer_to_1_better(tr) == pytest.approx((0.5 + 0.5 + 1) / 3, rel=1e-8)  # min(tr, 1/tr)
    assert T.true_better(tr) == pytest.approx((0.5 + 0 + 0) / 3, abs=1e-8)  # max(0, 1 - tr)


def test_normalised_probability_sums_the_wrong_options():
    p = T.normalised_probability([LN(2), -LN(0.8)], [[LN(4), LN(4)], [-LN(0.1), -LN(0.1)]])
    assert p == pytest.approx([0.5 / (0.5 + 0.25 + 0.25), 0.8 / (0.8 + 0.2)], rel=1e-8)


def test_harmonic_mean_matches_scipy_and_is_zero_with_a_zero():
    from scipy.stats import hmean

    assert T.hmean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert T.hmean([0.3, 0.7, 0.9]) == pytest.approx(hmean([0.3, 0.7, 0.9]))
    assert T.hmean([0.3, 0.0, 0.9]) == 0.0


def test_min_k_and_min_k_plus_plus_by_hand():
    logp = [-0.1, -2.0, -0.5, -3.0, -1.0]
    assert T.min_k_score(logp, 0.4) == pytest.approx(2.5)  # int(5 * 0.4) = 2 lowest: -3, -2
    assert T.min_k_score(logp, 0.1) == pytest.approx(3.0)  # at least one token
    assert T.min_k_score([], 0.4) == 0.0
    # z = (logp - mu) / sqrt(max(var, 1e-6)) = [0, -0.5, -2, 1, -3000]; lowest 2: -3000, -2
    z_logp, mu, var = [-1.0, -2.0, -3.0, -0.5, -4.0], [-1.0] * 5, [1.0, 4.0, 1.0, 0.25, 0.0]
    assert T.min_k_plus_plus_score(z_logp, mu, var, 0.4) == pytest.approx((3000 + 2) / 2)


def test_auc_convention_privleak_ks_and_zlib():
    # scores are "higher = less likely a member" (loss): forget rows with lower loss -> AUC 1
    assert T.mia_auc([0.1, 0.2, 0.3], [0.4, 0.5]) == 1.0
    assert T.mia_auc([0.4, 0.5], [0.1, 0.2, 0.3]) == 0.0
    assert T.mia_auc([0.2, 0.4], [0.2, 0.4]) == 0.5
    # privleak = ((1 - auc) - (1 - ref)) / (1 - ref) * 100
    assert T.privleak(0.5) == pytest.approx(0.0)
    assert T.privleak(0.75) == pytest.approx(-50.0)
    assert T.privleak(0.25) == pytest.approx(50.0)
    assert T.privleak(0.75, 0.75) == pytest.approx(0.0, abs=1e-6)
    assert T.ks_pvalue([0.1, 0.5, 0.9], [0.1, 0.5, 0.9]) == pytest.approx(1.0)
    assert T.ks_pvalue(np.linspace(0, 1, 30), np.linspace(5, 6, 30)) < 1e-6
    assert T.zlib_score(2.0, "abc") == pytest.approx(2.0 / len(zlib.compress(b"abc")))


# ---- scorers against the model -----------------------------------------------------------------------


def test_avg_nll_and_token_stats_match_a_manual_computation(tiny):
    model, tok, fmt, data = tiny
    rows = data.forget_eval[:3]
    pairs = [(r["question"], r["answer"]) for r in rows]
    scored = T.score_answers(model, fmt, pairs, batch_size=2, token_stats=True)
    enc = fmt.encode(*pairs[1])
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    answer = [t for t in range(1, len(enc["labels"])) if enc["labels"][t] != -100]
    token_lp = torch.stack([logp[t - 1, enc["input_ids"][t]] for t in answer])
    assert scored[1]["avg_nll"] == pytest.approx(float(-token_lp.mean()), rel=1e-5)
    # MIA statistics drop the last (end-of-sequence) target, as open-unlearning's tokenwise_logprobs
    assert np.allclose(scored[1]["logp"], token_lp[:-1].numpy(), atol=1e-5)
    # Min-K%++'s mean and variance of log p under the model's distribution, in float64 by hand
    p0 = logp[answer[0] - 1].double()
    mu = float((p0.exp() * p0).sum())
    assert scored[1]["mu"][0] == pytest.approx(mu, rel=1e-4)
    # E[lp^2] - mu^2 (open-unlearning's form) loses digits to cancellation; the centred form is the same
    assert scored[1]["var"][0] == pytest.approx(float((p0.exp() * (p0 - mu).square()).sum()), rel=1e-5)
    assert scored[1]["var"][0] == pytest.approx(float((p0.exp() * p0.square()).sum()) - mu**2, rel=1e-3)
    assert scored[1]["text"].strip() == rows[1]["answer"]


def test_left_padded_generation_equals_unpadded_single_generation(tiny):
    model, tok, fmt, data = tiny
    questions = [
        data.world_facts[0]["question"],
        data.forget_eval[0]["question"],
        data.real_authors[1]["question"],
    ]
    assert len({len(fmt.prompt_ids(q)) for q in questions}) == 3  # genuinely different padding
    batched = T.generate_answers(model, fmt, questions, batch_size=3, max_new_tokens=6)
    single = [T.generate_answers(model, fmt, [q], batch_size=1, max_new_tokens=6)[0] for q in questions]
    assert batched == single
    assert all(batched)


def test_evaluate_tofu_returns_every_key_in_range_and_compares_with_a_reference(tiny):
    model, tok, fmt, data = tiny
    model.train()
    res = T.evaluate_tofu(model, tok, fmt, data, batch_size=8, max_new_tokens=4)
    assert model.training  # the caller's mode comes back
    unit = [
        "forget_Q_A_Prob", "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "forget_Q_A_ROUGE",
        "forget_truth_ratio", "retain_Q_A_Prob", "retain_Q_A_PARA_Prob", "retain_Q_A_PERT_Prob",
        "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob", "ra_Q_A_PERT_Prob", "ra_Q_A_Prob_normalised",
        "ra_Q_A_ROUGE", "ra_Truth_Ratio", "wf_Q_A_Prob", "wf_Q_A_PERT_Prob", "wf_Q_A_Prob_normalised",
        "wf_Q_A_ROUGE", "wf_Truth_Ratio", "model_utility", "mia_loss", "mia_zlib", "mia_min_k",
        "mia_min_k_plus_plus",
    ]  # fmt: skip
    for key in unit:
        assert isinstance(res[key], float) and 0.0 <= res[key] <= 1.0, key
    assert res["model_utility"] == pytest.approx(T.hmean([res[k] for k in T.UTILITY_KEYS]))
    assert math.isfinite(res["privleak"]) and res["privleak"] == pytest.approx(T.privleak(res["mia_min_k"]))
    assert res["forget_quality"] is None
    per = res["per_example"]
    assert sorted(per["forget_truth_ratio_by_id"]) == [str(r["id"]) for r in data.forget_eval]
    assert all(v > 0 for v in per["forget_truth_ratio_by_id"].values())
    assert per["mia_auc"] == {k: res[k] for k in T.MIA_ATTACKS}
    assert len(per["mia_scores"]["mia_min_k"]["holdout"]) == len(data.holdout)
    json.dumps({k: v for k, v in res.items()})  # JSON-ready as it is

    # Against itself as the retain model: identical truth ratios and AUC -> p = 1, privleak = 0.
    ref = T.evaluate_tofu(model, tok, fmt, data, batch_size=8, max_new_tokens=4, reference=res)
    assert ref["forget_quality"] == pytest.approx(1.0)
    assert ref["privleak"] == pytest.approx(0.0, abs=1e-6)
