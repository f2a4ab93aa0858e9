"""NeurIPS 2023 challenge score and LiRA audit: hand-worked cases, with the arithmetic in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.eval.audit import level_or_spread, separable_reasons
from engine.eval.challenge import (
    challenge_score,
    epsilon_bins,
    epsilon_from_rates,
    example_epsilon,
    forgetting_quality,
    threshold_rates,
)
from engine.eval.lira import auc, lira_audit, lira_scores

DELTA = 1e-5


# ------------------------------------------------------------------------- a port of the starter kit, for checks


def _starter_kit_epsilon(u: np.ndarray, r: np.ndarray, delta: float) -> float:
    """``best_threshold_attack`` + ``compute_epsilon_s`` as in the challenge's starter kit, loops and all."""
    samples = np.concatenate((r, u))
    labels = np.array([0] * len(r) + [1] * len(u))
    fprs, fnrs = [], []
    for thresh in sorted(samples):
        ypred = (samples > thresh).astype(int)
        fprs.append(np.sum((ypred == 1) & (labels == 0)) / np.sum(labels == 0))
        fnrs.append(np.sum((ypred == 0) & (labels == 1)) / np.sum(labels == 1))
    per_attack = [0.0]
    for fpr_i, fnr_i in zip(fprs, fnrs):
        if fpr_i == 0 and fnr_i == 0:
            per_attack.append(np.inf)
        elif fpr_i == 0 or fnr_i == 0:
            pass
        else:
            with np.errstate(invalid="ignore"):
                e1 = np.log(1.0 - delta - fpr_i) - np.log(fnr_i)
                e2 = np.log(1.0 - delta - fnr_i) - np.log(fpr_i)
            per_attack.append(np.inf if np.isnan(e1) and np.isnan(e2) else np.nanmax([e1, e2]))
    return float(np.nanmax(per_attack))


# ------------------------------------------------------------------------------------------ threshold_rates


def test_threshold_rates_hand_worked_forward_and_reversed() -> None:
    # U = [3, 4, 5, 6] (unlearned = positives), R = [1, 2, 3, 4]. Thresholds: one below all (0), then 1..6.
    #   t:                 0    1    2    3    4    5    6
    #   FPR = #{R > t}/4:  1   3/4  2/4  1/4   0    0    0
    #   FNR = #{U <= t}/4: 0    0    0   1/4  2/4  3/4   1
    # reversed: FPR' = 1 - FPR, FNR' = 1 - FNR.
    fpr, fnr = threshold_rates([3, 4, 5, 6], [1, 2, 3, 4])
    fwd_fpr = [1, 0.75, 0.5, 0.25, 0, 0, 0]
    fwd_fnr = [0, 0, 0, 0.25, 0.5, 0.75, 1]
    np.testing.assert_array_equal(fpr, fwd_fpr + [1 - x for x in fwd_fpr])
    np.testing.assert_array_equal(fnr, fwd_fnr + [1 - x for x in fwd_fnr])

    fpr1, fnr1 = threshold_rates([3, 4, 5, 6], [1, 2, 3, 4], two_sided=False)
    np.testing.assert_array_equal(fpr1, fwd_fpr)
    np.testing.assert_array_equal(fnr1, fwd_fnr)


def test_threshold_rates_clip_infinite_statistics() -> None:
    # p_y == 1 / 0 gives s = +inf / -inf. After clipping, the "below all" threshold is still below every sample:
    # it calls everything unlearned (FPR = 1, FNR = 0), which would not hold with min - 1 = -inf.
    fpr, fnr = threshold_rates([-np.inf, 0.0], [-np.inf, np.inf], two_sided=False)
    assert (fpr[0], fnr[0]) == (1.0, 0.0)
    # thresholds: below, -1e4, 0, 1e4. FPR: 1, 1/2, 1/2, 0; FNR: 0, 1/2, 1, 1.
    np.testing.assert_array_equal(fpr, [1, 0.5, 0.5, 0])
    np.testing.assert_array_equal(fnr, [0, 0.5, 1, 1])


# ------------------------------------------------------------------------------------------ epsilons


def test_epsilon_from_rates_single_attack_closed_form() -> None:
    # FPR = 0.1, FNR = 0.2: eps1 = log(0.9 - d) - log(0.2) = log(4.5 - 5d); eps2 = log(0.8 - d) - log(0.1)
    # = log(8 - 10d) = 2.0794...; the max is eps2.
    assert epsilon_from_rates([0.1], [0.2], delta=DELTA) == pytest.approx(math.log(8 - 10 * DELTA), rel=1e-12)


def test_epsilon_from_rates_special_cases() -> None:
    # both zero: perfectly separable -> inf
    assert epsilon_from_rates([0.0], [0.0]) == math.inf
    # exactly one zero: discarded; nothing left but the floor 0
    assert epsilon_from_rates([0.0, 0.3], [0.3, 0.0]) == 0.0
    # FPR = FNR = 1: log(1 - d - 1) = log(-d) on both sides -> NaN, NaN -> inf
    assert epsilon_from_rates([1.0], [1.0]) == math.inf
    # FPR = 1, FNR = 0.5: eps1 = log(-d) = NaN, eps2 = log(0.5 - d) - log(1) < 0 -> nanmax = -0.69 -> floor 0
    assert epsilon_from_rates([1.0], [0.5]) == 0.0
    # a discarded attack does not hide a kept one: (0, 0.3) is dropped, (0.1, 0.2) gives log(8 - 10d)
    assert epsilon_from_rates([0.0, 0.1], [0.3, 0.2]) == pytest.approx(math.log(8 - 10 * DELTA))


def test_example_epsilon_forward_case() -> None:
    # U = [3, 4, 5, 6], R = [1, 2, 3, 4] (table in test_threshold_rates_hand_worked_forward_and_reversed).
    # Forward: only t = 3 has both rates > 0: FPR = FNR = 1/4 ->
    #   eps1 = eps2 = log(1 - d - 1/4) - log(1/4) = log(3 - 4d) = 1.0986...
    # Reversed: t = 1: (1/4, 1) -> log(0.75 - d) < 0; t = 2: (1/2, 1) -> log(0.5 - d) < 0; t = 3: (3/4, 3/4) ->
    #   log(0.25 - d) - log(0.75) < 0; t = 4: (1, 1/2) < 0; t = 5: (1, 1/4) < 0; t = 0, 6: one-sided. So both modes
    #   agree with the starter kit.
    expected = math.log(3 - 4 * DELTA)
    assert example_epsilon([3, 4, 5, 6], [1, 2, 3, 4]) == pytest.approx(expected, rel=1e-12)
    assert example_epsilon([3, 4, 5, 6], [1, 2, 3, 4], two_sided=False) == pytest.approx(expected, rel=1e-12)
    assert _starter_kit_epsilon(np.array([3.0, 4, 5, 6]), np.array([1.0, 2, 3, 4]), DELTA) == pytest.approx(
        expected
    )


def test_example_epsilon_reversed_direction_only_the_two_sided_rule_sees_it() -> None:
    # Over-forgetting: U = [1, 2, 3, 4] sits BELOW R = [3, 4, 5, 6].
    #   t:         0    1    2    3    4    5    6
    #   FPR:       1    1    1   3/4  2/4  1/4   0       (#{R > t}/4)
    #   FNR:       0   1/4  2/4  3/4   1    1    1       (#{U <= t}/4)
    # Forward: t = 1: eps1 = log(-d) NaN, eps2 = log(0.75 - d) = -0.29; t = 2: log(0.5 - d) = -0.69;
    #   t = 3: log(0.25 - d) - log(0.75) = -1.10; t = 4: log(0.5 - d) = -0.69; t = 5: log(0.75 - d) = -0.29;
    #   t = 0, 6 one-sided. Max with the floor: 0 -> the starter kit calls this example perfectly forgotten.
    # Reversed (FPR', FNR') = (0,1) (0,3/4) (0,1/2) (1/4,1/4) (1/2,0) (3/4,0) (1,0): only t = 3 is kept,
    #   eps = log(1 - d - 1/4) - log(1/4) = log(3 - 4d) = 1.0986 -> bin 3, score 1/4.
    u, r = [1, 2, 3, 4], [3, 4, 5, 6]
    assert example_epsilon(u, r, two_sided=False) == 0.0
    assert _starter_kit_epsilon(np.array(u, float), np.array(r, float), DELTA) == 0.0
    assert example_epsilon(u, r) == pytest.approx(math.log(3 - 4 * DELTA), rel=1e-12)


def test_example_epsilon_perfectly_separable_is_inf() -> None:
    # U = [10, 11], R = [0, 1]: at t = 1 no R is above (FPR = 0) and no U is at or below (FNR = 0) -> inf.
    assert example_epsilon([10, 11], [0, 1]) == math.inf
    assert example_epsilon([10, 11], [0, 1], two_sided=False) == math.inf
    # p_y == 1 in every unlearned model (s = +inf, clipped) is as separable.
    assert example_epsilon([np.inf, np.inf], [0, 1]) == math.inf


def test_example_epsilon_reversed_separation_hits_the_nan_rule() -> None:
    # U = [0, 1] entirely below R = [10, 11]. Forward rule at t = 1: FPR = #{R > 1}/2 = 1, FNR = #{U <= 1}/2 = 1
    # -> both logs of -d -> NaN -> inf. So even the starter kit catches *complete* reversed separation; only partial
    # overlap (previous test) slips through.
    assert example_epsilon([0, 1], [10, 11], two_sided=False) == math.inf
    assert example_epsilon([0, 1], [10, 11]) == math.inf


def test_example_epsilon_identical_distributions_is_zero() -> None:
    # U = R = [1, 2]: t = 1: (FPR, FNR) = (1/2, 1/2) -> log(0.5 - d) - log(0.5) < 0 on both sides; t = 2: (0, 1)
    # one-sided; below-all: (1, 0) one-sided. Reversed: the same pairs swapped. -> 0.
    assert example_epsilon([1, 2], [1, 2]) == 0.0
    assert example_epsilon([1, 2, 3, 4], [4, 3, 2, 1]) == 0.0


def test_example_epsilon_one_sided_attacks_are_discarded() -> None:
    # U = [5, 5, 5, 0], R = [0, 0, 0, 0]: three of four unlearned models stand apart, yet with R constant every
    # forward attack is one-sided:
    #   t = -1 (below all): FPR = 4/4 = 1, FNR = 0/4 = 0      -> discarded
    #   t = 0:              FPR = 0,       FNR = 1/4          -> discarded
    #   t = 5:              FPR = 0,       FNR = 4/4 = 1      -> discarded
    # so the starter kit has no finite estimate and returns the floor 0 (per_attack_epsilon = [0.]).
    u, r = [5, 5, 5, 0], [0, 0, 0, 0]
    fpr, fnr = threshold_rates(u, r, two_sided=False)
    np.testing.assert_array_equal(fpr, [1, 0, 0])
    np.testing.assert_array_equal(fnr, [0, 0.25, 1])
    assert not ((fpr > 0) & (fnr > 0)).any() and not ((fpr == 0) & (fnr == 0)).any()
    assert example_epsilon(u, r, two_sided=False) == 0.0
    # Reversed: t = 0 gives (FPR', FNR') = (1, 3/4): eps1 = NaN, eps2 = log(1/4 - d) - log(1) < 0; the rest is
    # one-sided. Still 0: the reversed rule does not change the starter kit's one-sided blind spot.
    assert example_epsilon(u, r) == 0.0


def test_vectorised_rates_match_the_starter_kit_loop() -> None:
    # Small integer statistics make many ties; K_u != K_r is allowed.
    rng = np.random.default_rng(0)
    for _ in range(200):
        u = rng.integers(0, 6, size=rng.integers(2, 9)).astype(float)
        r = rng.integers(0, 6, size=rng.integers(2, 9)).astype(float)
        ours = example_epsilon(u, r, two_sided=False)
        theirs = _starter_kit_epsilon(u, r, DELTA)
        assert ours == pytest.approx(theirs, rel=1e-12) or (ours == theirs == math.inf)
        # the two-sided estimate only adds attacks, so it is never smaller
        assert example_epsilon(u, r) >= ours


def test_two_sided_equals_one_sided_with_the_statistic_negated() -> None:
    # Reversing the rule on s is the forward rule on -s, up to ties at the threshold: the two-sided epsilon is the
    # max of the forward epsilons on s and on -s when all values are distinct.
    rng = np.random.default_rng(1)
    for _ in range(100):
        u, r = rng.normal(size=6), rng.normal(0.5, size=6)
        both = max(example_epsilon(u, r, two_sided=False), example_epsilon(-u, -r, two_sided=False))
        assert example_epsilon(u, r) == pytest.approx(both)


# ------------------------------------------------------------------------------------------ bins and F


def test_epsilon_bins_edges() -> None:
    # edges 0, 0.5, ..., 6.0; np.digitize is 1-based and right-open: [0, 0.5) -> 1, [0.5, 1) -> 2, [5.5, 6) -> 12,
    # >= 6 (inf included) -> 13.
    eps = [0.0, 0.49, 0.5, 5.99, 6.0, np.inf]
    np.testing.assert_array_equal(epsilon_bins(eps), [1, 1, 2, 12, 13, 13])
    # per-example score 2 / 2**n: 1, 1, 1/2, 2/4096, 2/8192, 2/8192
    expected_f = (1 + 1 + 0.5 + 2 / 4096 + 2 / 8192 + 2 / 8192) / 6
    assert forgetting_quality(eps) == pytest.approx(expected_f, rel=1e-15)


def test_forgetting_quality_extremes() -> None:
    assert forgetting_quality([0.0, 0.0, 0.2]) == 1.0
    assert forgetting_quality([np.inf, np.inf]) == 2 / 2**13
    # log(3 - 4d) = 1.0986 is in [1.0, 1.5) -> bin 3 -> 2 / 8
    assert forgetting_quality([math.log(3 - 4 * DELTA)]) == 0.25


# ------------------------------------------------------------------------------------------ challenge_score


def _three_examples() -> tuple[np.ndarray, np.ndarray]:
    # K_u = K_r = 4, N = 3 columns:
    #   col 0: U = R = [1, 2, 3, 4]                      -> eps 0     -> bin 1  -> 1
    #   col 1: U = [3, 4, 5, 6], R = [1, 2, 3, 4]        -> log(3-4d) -> bin 3  -> 1/4
    #   col 2: U = [10, 11, 12, 13], R = [0, 1, 2, 3]    -> inf       -> bin 13 -> 2/8192
    u = np.array([[1, 3, 10], [2, 4, 11], [3, 5, 12], [4, 6, 13]], dtype=float)
    r = np.array([[1, 1, 0], [2, 2, 1], [3, 3, 2], [4, 4, 3]], dtype=float)
    return u, r


def test_challenge_score_hand_worked() -> None:
    u, r = _three_examples()
    # retain: mean(0.9, 0.7) = 0.8 over mean(0.8, 1.0) = 0.9 -> 8/9; test: 0.6 / 0.8 -> 3/4.
    out = challenge_score(u, r, [0.9, 0.7], [0.8, 1.0], 0.6, [0.8])
    np.testing.assert_allclose(out["epsilons"], [0.0, math.log(3 - 4 * DELTA), math.inf])
    np.testing.assert_array_equal(out["bins"], [1, 3, 13])
    np.testing.assert_array_equal(out["example_scores"], [1.0, 0.25, 2 / 8192])
    f = (1 + 0.25 + 2 / 8192) / 3
    assert out["F"] == pytest.approx(f, rel=1e-15)
    assert out["retain_ratio"] == pytest.approx(8 / 9)
    assert out["test_ratio"] == pytest.approx(0.75)
    assert out["score"] == pytest.approx(f * 8 / 9 * 0.75)
    hist = out["histogram"]
    assert len(hist) == 13
    assert list(hist)[:3] == ["[0.0, 0.5)", "[0.5, 1.0)", "[1.0, 1.5)"]
    assert list(hist)[-2:] == ["[5.5, 6.0)", ">= 6.0"]
    assert hist["[0.0, 0.5)"] == 1 and hist["[1.0, 1.5)"] == 1 and hist[">= 6.0"] == 1
    assert sum(hist.values()) == 3
    assert (out["n_unlearned"], out["n_retrained"], out["n_examples"]) == (4, 4, 3)


def test_challenge_score_starter_kit_mode_misses_over_forgetting() -> None:
    # Add col 3: U = [1, 2, 3, 4] below R = [3, 4, 5, 6] (partial overlap). Two-sided: log(3 - 4d) -> 1/4;
    # starter kit: 0 -> 1.
    u, r = _three_examples()
    u = np.column_stack([u, [1, 2, 3, 4]])
    r = np.column_stack([r, [3, 4, 5, 6]])
    two = challenge_score(u, r, 1.0, 1.0, 1.0, 1.0)
    one = challenge_score(u, r, 1.0, 1.0, 1.0, 1.0, two_sided=False)
    assert two["bins"][3] == 3 and one["bins"][3] == 1
    assert two["F"] == pytest.approx((1 + 0.25 + 2 / 8192 + 0.25) / 4)
    assert one["F"] == pytest.approx((1 + 0.25 + 2 / 8192 + 1.0) / 4)
    assert two["score"] == two["F"]  # all accuracy ratios 1


def test_challenge_score_delta_changes_epsilon() -> None:
    # With d = 0.01 (some starter-kit copies): col 1 is log(1 - 0.01 - 0.25) - log(0.25) = log(2.96).
    u, r = _three_examples()
    out = challenge_score(u, r, 1.0, 1.0, 1.0, 1.0, delta=0.01)
    assert out["epsilons"][1] == pytest.approx(math.log(2.96))


# ------------------------------------------------------------------------------------------ bad inputs (A)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"unlearned": np.ones(4)}, "2-D"),
        ({"unlearned": np.ones((1, 3))}, "at least 2 models"),
        ({"retrained": np.ones((4, 2))}, "same forget examples"),
        ({"unlearned": np.array([[1.0, np.nan, 1.0]] * 4)}, "NaN"),
        ({"retain_acc_u": 90.0}, "fractions, not percent"),
        ({"test_acc_r": [0.0, 0.0]}, "averages to 0"),
        ({"retain_acc_u": []}, "empty"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"width": 0.0}, "width"),
        ({"bins": 1}, "bins"),
    ],
)
def test_challenge_score_rejects_bad_inputs(kwargs: dict, match: str) -> None:
    u, r = _three_examples()
    args = {
        "unlearned": u,
        "retrained": r,
        "retain_acc_u": 0.9,
        "retain_acc_r": 0.9,
        "test_acc_u": 0.8,
        "test_acc_r": 0.8,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        challenge_score(**args)


def test_epsilon_helpers_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        example_epsilon([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        threshold_rates([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        threshold_rates([[1.0, 2.0]], [1.0, 2.0])
    with pytest.raises(ValueError, match="same length"):
        epsilon_from_rates([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="rates"):
        epsilon_from_rates([1.5], [0.1])
    with pytest.raises(ValueError, match=">= 0"):
        epsilon_bins([-0.1])
    with pytest.raises(ValueError, match="NaN"):
        forgetting_quality([np.nan])
    with pytest.raises(ValueError, match="at least one"):
        forgetting_quality([])


# ------------------------------------------------------------------------------------------ auc


def test_auc_hand_cases() -> None:
    assert auc([2, 3], [0, 1]) == 1.0  # every positive above every negative
    assert auc([0, 1], [2, 3]) == 0.0
    assert auc([1, 1], [1, 1, 1]) == 0.5  # all ties count 1/2
    assert auc([1, 3], [2, 2]) == 0.5  # pairs: 1<2, 1<2, 3>2, 3>2 -> 2/4
    assert auc([2], [1, 2]) == 0.75  # 2>1 counts 1, 2=2 counts 1/2 -> 1.5/2
    assert auc([1], [0, 1, 2]) == 0.5  # 1 + 1/2 + 0 over 3


def test_auc_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auc([1.0], [np.nan])


# ------------------------------------------------------------------------------------------ lira_scores


def test_lira_closed_form() -> None:
    # One example. IN = [1, 3]: mu_in = 2, var_in = ((1-2)^2 + (3-2)^2) / (2-1) = 2.
    # OUT = [-2, -4, -3]: mu_out = -3, var_out = (1 + 1 + 0) / 2 = 1.
    # Lambda(t) = log(s_out / s_in) - (t - mu_in)^2 / (2 var_in) + (t - mu_out)^2 / (2 var_out)
    #           = -0.5 log 2 - (t - 2)^2 / 4 + (t + 3)^2 / 2
    #   t = 0:  -0.5 log 2 - 1 + 4.5   =  3.5 - 0.5 log 2
    #   t = 2 (the IN mean):  -0.5 log 2 - 0 + 12.5 > 0
    #   t = -3 (the OUT mean): -0.5 log 2 - 25/4 + 0 < 0
    ins = np.array([[1.0], [3.0]])
    outs = np.array([[-2.0], [-4.0], [-3.0]])
    targets = np.array([[0.0], [2.0], [-3.0]])
    lam = lira_scores(targets, ins, outs, fixed_variance=False)
    half_log2 = 0.5 * math.log(2)
    np.testing.assert_allclose(lam[:, 0], [3.5 - half_log2, 12.5 - half_log2, -6.25 - half_log2], rtol=1e-12)
    assert lam[1, 0] > 0 > lam[2, 0]
    # the same with scipy's densities, an independent formula
    stats = pytest.importorskip("scipy.stats")
    ref = stats.norm.logpdf(targets, 2.0, math.sqrt(2.0)) - stats.norm.logpdf(targets, -3.0, 1.0)
    np.testing.assert_allclose(lam, ref, rtol=1e-12)
    # a 1-D target is one model
    np.testing.assert_allclose(lira_scores(np.array([0.0]), ins, outs, fixed_variance=False), lam[0])


def test_lira_fixed_variance_pools_within_example_variances() -> None:
    # Two examples. IN col 0 = [1, 3] (mean 2, var 2), col 1 = [0, 0] (mean 0, var 0).
    # OUT col 0 = [-2, -4, -3] (mean -3, var 1), col 1 = [5, 7, 6] (mean 6, var 1).
    # Pooled: var_in = (2 + 0) / 2 = 1, var_out = (1 + 1) / 2 = 1. Target t = [0, 0]:
    #   fixed:    col 0: 0 - (0-2)^2/2 + (0+3)^2/2 = 2.5;   col 1: 0 - 0 + (0-6)^2/2 = 18
    #   per-example: col 0: 3.5 - 0.5 log 2 (as above); col 1: var_in = 0 -> sigma floored at 1e-3:
    #             log(1 / 1e-3) - 0 + 18 = log(1000) + 18
    ins = np.array([[1.0, 0.0], [3.0, 0.0]])
    outs = np.array([[-2.0, 5.0], [-4.0, 7.0], [-3.0, 6.0]])
    t = np.zeros((1, 2))
    np.testing.assert_allclose(lira_scores(t, ins, outs, fixed_variance=True)[0], [2.5, 18.0], rtol=1e-12)
    np.testing.assert_allclose(
        lira_scores(t, ins, outs, fixed_variance=False)[0],
        [3.5 - 0.5 * math.log(2), math.log(1000) + 18.0],
        rtol=1e-12,
    )
    # None with fewer than 64 models on a side -> fixed
    np.testing.assert_array_equal(lira_scores(t, ins, outs), lira_scores(t, ins, outs, fixed_variance=True))


def test_lira_auto_variance_switches_at_64_models() -> None:
    rng = np.random.default_rng(3)
    t = rng.normal(size=(2, 5))
    for k, fixed in ((63, True), (64, False)):
        ins = rng.normal(1.0, rng.uniform(0.5, 2.0, size=5), size=(k, 5))
        outs = rng.normal(0.0, rng.uniform(0.5, 2.0, size=5), size=(k, 5))
        auto = lira_scores(t, ins, outs)
        np.testing.assert_array_equal(auto, lira_scores(t, ins, outs, fixed_variance=fixed))
        assert not np.allclose(auto, lira_scores(t, ins, outs, fixed_variance=not fixed))


def test_lira_scores_rejects_bad_inputs() -> None:
    ins, outs = np.ones((2, 3)), np.zeros((3, 3))
    with pytest.raises(ValueError, match="same forget examples"):
        lira_scores(np.zeros((1, 2)), ins, outs)
    with pytest.raises(ValueError, match="at least 2"):
        lira_scores(np.zeros((1, 3)), np.ones((1, 3)), outs)
    with pytest.raises(ValueError, match="NaN"):
        lira_scores(np.full((1, 3), np.nan), ins, outs)
    with pytest.raises(ValueError, match="min_sigma"):
        lira_scores(np.zeros((1, 3)), ins, outs, min_sigma=0.0)


# ------------------------------------------------------------------------------------------ lira_audit


def test_lira_audit_leave_one_out_hand_worked() -> None:
    # One example. IN = [8, 10]: mu_in = 9, var_in = 2. Retrained R = [0, 2, 6], unlearned U = [9].
    # Retrained model k is scored against the OTHER two:
    #   k = 2 (s = 6): OUT = [0, 2], mu = 1, var = 2 -> Lambda = log(1) - (6-9)^2/4 + (6-1)^2/4 = -9/4 + 25/4 = 4
    #     (had it been included: OUT = [0, 2, 6], mu = 8/3, var = 84/9 ->
    #      0.5 log((84/9)/2) - 9/4 + (6 - 8/3)^2 / (2 * 84/9) = 0.770 - 2.25 + 0.595 = -0.885 < 0: the sign flips)
    #   k = 0 (s = 0): OUT = [2, 6], mu = 4, var = 8 -> log(sqrt(8)/sqrt(2)) - 81/4 + 16/16 = log 2 - 19.25
    #   k = 1 (s = 2): OUT = [0, 6], mu = 3, var = 18 -> log(sqrt(18)/sqrt(2)) - 49/4 + 1/36 = log 3 - 12.25 + 1/36
    # Unlearned: OUT = all of R (mu 8/3, var 84/9): 0.5 log(42/9) - 0 + (9 - 8/3)^2 / (2 * 84/9)
    #   = 0.5 log(14/3) + 361/168 = 2.919 > 0.
    out = lira_audit([[9.0]], [[0.0], [2.0], [6.0]], [[8.0], [10.0]], fixed_variance=False)
    lam_r = out["lambda_retrained"][:, 0]
    np.testing.assert_allclose(lam_r, [math.log(2) - 19.25, math.log(3) - 12.25 + 1 / 36, 4.0], rtol=1e-12)
    with_itself = lira_scores([[6.0]], [[8.0], [10.0]], [[0.0], [2.0], [6.0]], fixed_variance=False)[0, 0]
    assert with_itself == pytest.approx(0.5 * math.log(42 / 9) - 2.25 + (10 / 3) ** 2 / (2 * 84 / 9))
    assert with_itself < 0 < lam_r[2]
    lam_u = 0.5 * math.log(14 / 3) + 361 / 168
    assert out["lambda_unlearned"][0, 0] == pytest.approx(lam_u, rel=1e-12)
    assert out["member_rate_unlearned"] == 1.0
    assert out["member_rate_retrained"] == pytest.approx(1 / 3)
    assert out["mean_lambda_unlearned"] == pytest.approx(lam_u)
    assert out["mean_lambda_retrained"] == pytest.approx(lam_r.mean())
    # AUC: 2.919 beats -18.56 and -11.12 but not 4.0 -> 2/3
    assert out["auc"] == pytest.approx(2 / 3)
    assert out["fixed_variance"] is False
    assert (out["n_unlearned"], out["n_retrained"], out["n_inside"], out["n_examples"]) == (1, 3, 2, 1)


def test_lira_audit_worst_examples_and_per_example_means() -> None:
    # IN mean 5 everywhere, OUT (retrained) mean 0; the unlearned models sit at 0, 5 and 2.5 on the three
    # examples: example 1 looks most like a member, then 2, then 0.
    ins = np.array([[4.0, 4.0, 4.0], [6.0, 6.0, 6.0]])
    r = np.array([[-1.0, -1.0, -1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    u = np.array([[0.0, 5.0, 2.5], [0.0, 5.0, 2.5]])
    out = lira_audit(u, r, ins)
    np.testing.assert_array_equal(out["worst_examples"], [1, 2, 0])
    pe = out["per_example_lambda_unlearned"]
    assert pe.shape == (3,) and pe[1] > 0 > pe[0]
    assert out["per_example_lambda_retrained"].shape == (3,)
    # K_in = 2, K_r - 1 = 2 < 64 -> the fixed variance is used
    assert out["fixed_variance"] is True


def test_lira_audit_separates_members_from_retrained() -> None:
    rng = np.random.default_rng(5)
    n = 200
    mu_in, mu_out = rng.normal(3.0, 1.0, size=n), rng.normal(0.0, 1.0, size=n)
    ins = rng.normal(mu_in, 0.7, size=(8, n))
    r = rng.normal(mu_out, 0.7, size=(8, n))
    # unlearning that did nothing: the unlearned models are IN models
    kept = lira_audit(rng.normal(mu_in, 0.7, size=(8, n)), r, ins)
    assert kept["auc"] > 0.95 and kept["member_rate_unlearned"] > 0.9
    # perfect unlearning: the unlearned models are fresh OUT models
    perfect = lira_audit(rng.normal(mu_out, 0.7, size=(8, n)), r, ins)
    assert abs(perfect["auc"] - 0.5) < 0.05
    assert perfect["member_rate_unlearned"] < 0.1 and perfect["member_rate_retrained"] < 0.1


def test_lira_audit_rejects_bad_inputs() -> None:
    ins, u = np.ones((2, 3)), np.zeros((2, 3))
    with pytest.raises(ValueError, match="at least 3"):
        lira_audit(u, np.zeros((2, 3)), ins)  # K_r = 2 leaves one model for the leave-one-out fit
    with pytest.raises(ValueError, match="same forget examples"):
        lira_audit(u, np.zeros((3, 4)), ins)
    with pytest.raises(ValueError, match="at least 2"):
        lira_audit(u, np.zeros((3, 3)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="2-D"):
        lira_audit(np.zeros(3), np.zeros((3, 3)), ins)


def test_null_level_is_below_one_and_lower_when_two_sided() -> None:
    # Unlearned and retrained drawn from the same distribution: the max over noisy attacks still finds epsilon > 0.5
    # for most examples, and the two-sided family (twice the attacks) finds more. Documented in the module docstring.
    rng = np.random.default_rng(0)
    u, r = rng.normal(size=(8, 400)), rng.normal(size=(8, 400))
    one = challenge_score(u, r, 1.0, 1.0, 1.0, 1.0, two_sided=False)["F"]
    two = challenge_score(u, r, 1.0, 1.0, 1.0, 1.0)["F"]
    assert 0.4 < one < 0.65
    assert 0.2 < two < 0.35


# ------------------------------------------------------------------------------- why an example stays separable

# One forget example per column, K = 4 models per side (columns of U and R). Medians, R's range, and the epsilon
# (two-sided, delta 1e-5) each column gets:
SEP_COLUMNS = [
    # 0: U above R, R all confident (no boundary): median 4.5 > 2.5, eps = log 3 -> too_confident
    ([3, 4, 5, 6], [1, 2, 3, 4]),
    # 1: U entirely below R: the perfectly reversed case, eps = inf -> over_forgotten
    ([-6, -5, -4, -3], [1, 2, 3, 4]),
    # 2: R straddles 0 (-1 < 0 < 2), so does U, and median U = 0 lies inside [-1, 2]; eps = log 2 > 0 from the
    #    narrower U -> near_boundary (checked before the direction: median U 0 = median R 0 here anyway)
    ([-0.9, -0.6, 0.6, 0.7], [-1, -0.5, 0.5, 2]),
    # 3: identical groups: eps = 0 -> None
    ([1, 2, 3, 4], [1, 2, 3, 4]),
    # 4: R straddles 0 but every unlearned model is confidently right: not near_boundary (U does not straddle);
    #    median 1.95 > 0 -> too_confident (the method keeps the label of a hard example)
    ([1.9, 1.9, 2, 2], [-1, -0.5, 0.5, 2.1]),
    # 5: both straddle 0, median U 1 inside R's range [-1, 2] -> near_boundary, although median U > median R 0.5
    ([-0.5, 1, 1, 1.5], [-1, 0.5, 0.5, 2]),
]


def _sep_margins() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u = np.array([c[0] for c in SEP_COLUMNS], dtype=float).T  # [K = 4, N = 6]
    r = np.array([c[1] for c in SEP_COLUMNS], dtype=float).T
    eps = np.array([example_epsilon(u[:, i], r[:, i]) for i in range(u.shape[1])])
    return u, r, eps


def test_separable_reasons_one_example_per_reason_and_an_inseparable_one() -> None:
    u, r, eps = _sep_margins()
    assert eps[3] == 0.0 and math.isinf(eps[1])
    assert eps[0] == pytest.approx(math.log(3.0), abs=1e-4) and eps[2] == pytest.approx(
        math.log(2.0), abs=1e-4
    )
    assert (eps[[0, 2, 4, 5]] > 0).all()
    reasons = separable_reasons(u, r, eps)
    assert reasons == [
        "too_confident",
        "over_forgotten",
        "near_boundary",
        None,
        "too_confident",
        "near_boundary",
    ]
    assert {k: reasons.count(k) for k in ("too_confident", "over_forgotten", "near_boundary")} == {
        "too_confident": 2,
        "over_forgotten": 1,
        "near_boundary": 2,
    }
    # the reason follows epsilon, not the margins: the same margins with epsilon 0 everywhere get no reason
    assert separable_reasons(u, r, np.zeros(6)) == [None] * 6


def test_separable_reasons_tie_breaks_and_bad_inputs() -> None:
    # Medians tie (1 = 1): the means decide. U mean 1, R mean 0.05 -> too_confident; mirrored -> over_forgotten.
    # R straddles 0 but U does not, so not near_boundary. Medians and means both tie: near_boundary (spread only).
    # Threshold attacks rarely give such ties epsilon > 0, so epsilon is passed by hand here.
    u = np.array([[0.9, -1.1, 7], [1, -1, 8], [1, -1, 12], [1.1, -0.9, 13]])
    r = np.array([[-3, -1.2, 9.5], [1, -1, 9.9], [1, -1, 10.1], [1.2, 3, 10.5]])
    assert separable_reasons(u, r, [1.0, 1.0, 1.0]) == ["too_confident", "over_forgotten", "near_boundary"]
    # +-inf margins (p_y rounded to 1 or 0) are clipped, as for the epsilons
    assert separable_reasons([[np.inf], [np.inf]], [[1.0], [2.0]], [np.inf]) == ["too_confident"]
    with pytest.raises(ValueError, match="same forget examples"):
        separable_reasons(u, r, [1.0, 1.0])
    with pytest.raises(ValueError, match=">= 0 and not NaN"):
        separable_reasons(u, r, [1.0, np.nan, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        separable_reasons(np.full((2, 3), np.nan), r[:2], [0.0, 0.0, 0.0])


def test_audit_json_and_report_carry_the_reasons() -> None:
    # The recipe's score() -> audit.json and render() -> audit.md, from synthetic per-model statistics (no model).
    import json
    from types import SimpleNamespace

    from engine.eval.audit import score
    from engine.eval.audit_report import render, render_level_or_spread
    from engine.io import json_safe

    u, r, eps = _sep_margins()
    seeds, ids = [1, 2, 3, 4], [f"x{i}" for i in range(u.shape[1])]

    def model(margin: np.ndarray) -> dict:
        return {
            "margin": margin.tolist(),
            "forget_acc": 0.5,
            "retain_acc": 0.9,
            "test_acc": 0.8,
            "seconds": 1.0,
        }

    models = {("unlearn", s): model(u[k]) for k, s in enumerate(seeds)}
    models |= {("retrain", s): model(r[k]) for k, s in enumerate(seeds)}
    a = SimpleNamespace(delta=1e-5, two_sided=True, worst=3)
    result = score(models, seeds, ["retrain"], ids, a)
    result.update(
        method={"name": "synthetic"},
        forget={"description": "6 hand-built examples", "size": 6, "ids_sha256": "0" * 64},
        model_path="nowhere",
        cache={"dir": "nowhere", "reused": 4, "trained": 0},
        seconds={"tasks_wall": 1.0, "total": 1.0, **result["seconds"]},
    )
    out = json.loads(json.dumps(json_safe(result)))

    ex = out["examples"]
    assert [e["reason"] for e in ex] == separable_reasons(u, r, eps)
    # the existing keys are unchanged: epsilon (null when infinite), separable (= infinite), bin
    assert [e["separable"] for e in ex] == [False, True, False, False, False, False]
    assert ex[1]["epsilon"] is None
    assert ex[0]["epsilon"] == pytest.approx(eps[0]) and ex[0]["bin"] == 3
    # the numbers the rule used
    assert (ex[0]["u_margin_median"], ex[0]["r_margin_median"]) == (4.5, 2.5)
    assert (ex[4]["r_margin_min"], ex[4]["r_margin_max"], ex[4]["u_margin_median"]) == (-1.0, 2.1, 1.95)
    assert out["distinguishable"] == {
        "count": 5,
        "perfectly_separable": 1,
        "by_reason": {"near_boundary": 2, "too_confident": 2, "over_forgotten": 1},
    }
    # worst first (inf, then log 3 with the larger mean gap, ...), each with its reason
    assert [(w["id"], w["reason"]) for w in out["worst"]] == [
        ("x1", "over_forgotten"),
        ("x0", "too_confident"),
        ("x5", "near_boundary"),
    ]

    # the per-example spread beside the medians, and the level-or-spread split of F
    assert ex[0]["u_margin_std"] == pytest.approx(np.std(u[:, 0], ddof=1))
    assert ex[0]["r_margin_std"] == pytest.approx(np.std(r[:, 0], ddof=1))
    assert out["level_or_spread"] == {**level_or_spread(u, r, 1e-5, True), "f_trained_on_d": None}

    md = render(result)
    assert "### Level or spread" in md
    assert "### What is left to forget" in md and "5 of 6 forget examples have epsilon > 0" in md
    assert "| too_confident | 2 |" in md and "| over_forgotten | 1 |" in md and "| near_boundary | 2 |" in md
    assert "| x1 | inf | over_forgotten |" in md

    # with the K models trained on D (LiRA's), their own F against the retrained ones: forgetting nothing
    models |= {("original", s): model(r[k] + 1.0) for k, s in enumerate(seeds)}
    # and the Original's own s. Told apart by level (|median U - median R| > R's SD): x0 (2 > 1.29), x1 (7 > 1.29),
    # x4 (1.95 > 1.37); by spread: x2 (0), x5 (0.5 < 1.22). The Original already beyond R's SD on the same side:
    # x0 (4 - 2.5 = 1.5 > 1.29) and x1 (-3 - 2.5); x4's Original sits at R's median (0): the unlearning moved it.
    orig = [4.0, -3.0, 0.0, 2.5, 0.0, 1.0]
    full = score(models, seeds, ["retrain", "original"], ids, a, original=orig)
    with_d = full["level_or_spread"]
    assert with_d["f_trained_on_d"] == challenge_score(r + 1.0, r, 1, 1, 1, 1, 1e-5, True)["F"]
    assert (with_d["beyond_spread"], with_d["within_spread"], with_d["inherited_from_original"]) == (3, 2, 2)
    assert [e["o_margin"] for e in full["examples"]] == orig
    assert out["level_or_spread"]["inherited_from_original"] is None and ex[0]["o_margin"] is None
    md = "\n".join(render_level_or_spread(with_d, 0.5, two_sided=True))
    assert "forget nothing but vary as training does, score F = " in md
    assert "Of those 3 told apart by level, 2 were already there before unlearning" in md


def _one_original(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Retrained models: per-example level + a seed's spread (sd 1). Unlearned models of one original: exactly
    retraining's per-example medians, and a twentieth of its spread."""
    level = rng.normal(0, 3, size=60)
    r = level + rng.standard_normal((8, 60))
    z = rng.standard_normal((8, 60))
    u = np.median(r, axis=0) + 0.05 * (z - np.median(z, axis=0))  # medians equal r's by construction
    return u, r


def test_level_or_spread_prices_the_spread_when_the_medians_are_right() -> None:
    from engine.eval.audit_report import render_level_or_spread

    u, r = _one_original(np.random.default_rng(3))
    ls = level_or_spread(u, r, DELTA, two_sided=False)
    assert ls["spread_ratio"] == pytest.approx(u.std(0, ddof=1).mean() / r.std(0, ddof=1).mean())
    assert ls["spread_ratio"] < 0.1 and ls["draws"] == 20
    # equal centres and scales, equal draws: giving them retraining's spread makes them retraining, in the model
    assert ls["f_retrained_spread"] == ls["f_retrained"]
    # their own tight spread around the right medians is what separates them, and the model reproduces the F
    # the attacks measure on the models themselves
    measured = challenge_score(u, r, 1, 1, 1, 1, DELTA, two_sided=False)["F"]
    assert ls["f_retrained_level"] == ls["f_unlearned"]  # medians equal: these two mixes are one
    assert ls["f_unlearned"] < ls["f_retrained"] - 0.15
    assert ls["f_unlearned"] == pytest.approx(measured, abs=0.08)
    # every example the attacks separate is separated by the spread: no median is off
    eps = np.array(challenge_score(u, r, 1, 1, 1, 1, DELTA, two_sided=False)["epsilons"])
    assert ls["distinguishable"] == int(np.sum(eps > 0)) > 20
    assert (ls["within_spread"], ls["beyond_spread"]) == (ls["distinguishable"], 0)
    md = "\n".join(render_level_or_spread(ls, measured, two_sided=False))
    assert f"{ls['beyond_spread']} have the unlearned median more than one retrained standard deviation" in md
    assert "understates what the level costs" in md  # the one-sided attacks' blind side, said


def test_level_or_spread_under_one_sided_attacks_does_not_see_a_median_below_retrainings() -> None:
    # why the mix "their level, retraining's spread" understates the level under the starter kit's attacks:
    # models that are retraining's shifted down (over-forgotten) are invisible to "unlearned if s > t"
    r = np.random.default_rng(6).normal(0, 3, size=60) + np.random.default_rng(7).standard_normal((8, 60))
    # (a shift of one seed's spread: the groups overlap, so the starter kit's "perfectly wrong" rule does not fire)
    ls = level_or_spread(r - 1.0, r, DELTA, two_sided=False, draws=5)
    assert ls["f_retrained_spread"] > ls["f_retrained"] + 0.3 and ls["distinguishable"] == 0
    both = level_or_spread(r - 1.0, r, DELTA, two_sided=True, draws=5)
    assert both["f_retrained_spread"] < both["f_retrained"] - 0.1 and both["distinguishable"] > 30


def test_level_or_spread_counts_the_level_when_the_spread_is_right() -> None:
    from engine.eval.audit_report import render_level_or_spread

    r = np.random.default_rng(4).normal(0, 3, size=60) + np.random.default_rng(5).standard_normal((8, 60))
    u = r + 2.5  # retraining's models, every one more confident by the same amount: the level alone is off
    ls = level_or_spread(u, r, DELTA, two_sided=True, draws=5)
    assert ls["spread_ratio"] == pytest.approx(1.0)
    assert ls["f_retrained_level"] == pytest.approx(ls["f_retrained"])
    assert ls["f_retrained_spread"] == pytest.approx(ls["f_unlearned"])
    assert ls["f_unlearned"] < ls["f_retrained"] - 0.15
    # every example the attacks separate is separated by its level, and two-sided attacks need no caveat
    assert (ls["beyond_spread"], ls["within_spread"]) == (ls["distinguishable"], 0)
    assert ls["distinguishable"] > 50
    assert "understates" not in "\n".join(render_level_or_spread(ls, 0.1, two_sided=True))
    with pytest.raises(ValueError, match="same forget examples"):
        level_or_spread(u[:, :5], r)
    with pytest.raises(ValueError, match="draws must be >= 1"):
        level_or_spread(u, r, draws=0)
    with pytest.raises(ValueError, match="one s per forget example"):
        level_or_spread(u, r, original=np.zeros(5))
    # an original already where the unlearned models are: every level-separated example is inherited
    assert (
        level_or_spread(u, r, draws=1, original=np.median(u, axis=0))["inherited_from_original"]
        == ls["beyond_spread"]
    )
