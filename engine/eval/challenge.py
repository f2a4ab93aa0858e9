"""Many-model unlearning audits: the NeurIPS 2023 challenge's forgetting score and a LiRA-style attack (numpy only).

Both audits compare *distributions over models*: many unlearned models (one unlearning run per seed) against many
models retrained from scratch without the forget set. The caller computes, once per model and forget example, the
logit-scaled confidence on the true label,

    s = log p_y - log(1 - p_y)        (from logits: logit_y - logsumexp(logits without y)),

and hands over matrices of shape [K models, N forget examples]. No model or tensor library is involved here.

Part A, :func:`challenge_score`: the NeurIPS 2023 Machine Unlearning Challenge's score (Triantafillou et al., 2024,
"Are we making progress in unlearning? Findings from the first NeurIPS unlearning competition"; the scoring code of
the challenge's starter kit / Kaggle evaluation, functions ``best_threshold_attack``, ``compute_epsilon_s``,
``bin_index_fn`` and ``F``). Per forget example:

1. A family of threshold attacks on s tries to tell the K_u unlearned values from the K_r retrained ones; each gives
   a false-positive rate (a retrained model called "unlearned") and a false-negative rate (:func:`threshold_rates`).
2. Each attack's (FPR, FNR) is turned into an (epsilon, delta) privacy estimate and the example's epsilon is the
   worst over the attacks (:func:`epsilon_from_rates`, :func:`example_epsilon`).
3. Epsilons are put in bins 0.5 wide (:func:`epsilon_bins`); bin n scores 2 / 2**n, so epsilon < 0.5 scores 1, and
   the forgetting quality F is the mean over the forget set (:func:`forgetting_quality`).
4. The final score is F times the retain- and test-accuracy ratios, unlearned over retrained.
5. Diagnostic, not part of the score: :func:`separable_reasons` says, per example with epsilon > 0, whether the
   unlearned models are too confident, over-forgotten, or only differ near the decision boundary; and
   :func:`level_or_spread` what the unlearned models' spread over seeds costs F, and how many examples their level
   separates.

Deliberate differences from the starter kit, each a keyword argument away from the original:

* ``two_sided=True`` (default) adds the reversed rule "predict unlearned if s <= t" for every threshold. The starter
  kit only asks "is s *higher* than retraining would give?", so an unlearning method that over-forgets (drives the
  forget examples' confidence *below* what a retrained model has, as gradient ascent or too many SCRUB max-steps
  can) scores as perfectly private unless the two groups are completely separated. ``two_sided=False``
  reproduces the starter kit's attack family exactly. This is a strengthening: every attack of the original family
  is still there, so the two-sided epsilon is never smaller.
* ``delta`` defaults to 1e-5 (the value docs/evaluation.md gives for the challenge). Copies of the starter kit seen in
  public repositories call ``forgetting_quality(..., delta=0.01)``; pass ``delta=0.01`` to compare with those.
* Only the threshold family is implemented; some starter-kit copies also add a cross-validated logistic-regression
  attack on the same scalar (on one feature it is itself a threshold rule, fitted on part of the data), left out.
* The threshold list has one value below every sample besides the pooled samples themselves (the starter kit uses
  the pooled samples only). That attack calls everything "unlearned" (FPR = 1, FNR = 0) and is always discarded as
  one-sided, so it changes no result; it is there so that the rate arrays describe the full ROC curve.
* s is clipped to [-1e4, 1e4] (see ``S_CLIP``), so p_y of exactly 0 or 1 (s = -inf / +inf) is accepted.
* delta must be > 0: with delta = 0 the starter kit's "both logs NaN -> inf" rule turns into "both -inf -> ignored"
  and a perfectly reversed example would score epsilon 0.

Resolution: with K models per side the smallest non-zero rate is 1/K, so the largest *finite* epsilon is about
log(K - 1) (1.9 for K = 8, 3.4 for K = 32, 6.2 for K = 512, the challenge's value). With few models the top bins
are reachable only through the "perfectly separable" rule (epsilon = inf); compare scores at equal K only.

Null level: the score is a maximum over many noisy attacks, so even two independent groups drawn from the *same*
distribution score well below F = 1. Measured on Gaussian draws (1000 examples): F = 0.62 / 0.51 / 0.40 for K = 4 /
8 / 512 models per side with the starter kit's one-sided family, and 0.38 / 0.28 / 0.22 with ``two_sided=True``
(twice the attacks, twice the chances to overfit the noise). Two-sided scores are therefore not comparable with the
challenge's leaderboard; compare methods with each other, at equal K and mode, next to a retrained-vs-retrained
score computed the same way.

Part B, :func:`lira_audit`: a per-example likelihood-ratio attack after Carlini et al. (2022), "Membership inference
attacks from first principles" (LiRA; reference code ``tensorflow/privacy`` ``research/mi_lira_2021``). For each
forget example, Gaussians are fitted to s over IN models (trained with the example, e.g. originals from several
seeds) and OUT models (trained without it: the retrained models); a target model's score is the log-likelihood ratio
Lambda = log N(s; mu_in, sigma_in^2) - log N(s; mu_out, sigma_out^2), > 0 meaning "looks like a member". A perfect
unlearning method gives unlearned models whose Lambda is distributed like a held-out retrained model's; the AUC
between the two is 0.5. Differences from the reference code, all documented at :func:`lira_scores`: means instead of
medians, the unbiased variance, and a within-example pooled variance for ``fixed_variance``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "SEPARABLE_REASONS",
    "S_CLIP",
    "auc",
    "challenge_score",
    "epsilon_bins",
    "epsilon_from_rates",
    "example_epsilon",
    "forgetting_quality",
    "level_or_spread",
    "lira_audit",
    "lira_scores",
    "separable_reasons",
    "threshold_rates",
]

# s = log p - log(1 - p) is +inf when a float32 softmax rounds p_y to 1 and -inf when it rounds it to 0. Infinite
# values break the "one threshold below every sample" (min - 1 = -inf) and the Gaussian fits (inf - inf = NaN), so
# they are clipped. 1e4 is far outside anything a finite logit margin produces in practice, so the clip only ever
# acts on the infinities, and it keeps their order (all +inf stay tied at the top, all -inf at the bottom).
S_CLIP = 1e4

# Carlini et al. recommend one variance shared by all examples when there are fewer than 64 reference models: a
# per-example variance from a handful of values is too noisy and makes Lambda explode where it happens to be tiny.
LIRA_FIXED_VARIANCE_BELOW = 64

# Floor on a fitted standard deviation (logit units). A statistic that is identical in every reference model (the
# same clipped +-inf, or deterministic training) has variance 0 and log N(.) would divide by zero. Seed-to-seed spread
# of s is typically 0.1-1 or more, so 1e-3 acts only on such degenerate examples.
LIRA_MIN_SIGMA = 1e-3


# ------------------------------------------------------------------------------------------------ validation


def _stats_1d(values: ArrayLike, name: str, min_models: int = 2) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per model for one example), got shape {arr.shape}")
    if arr.size < min_models:
        raise ValueError(
            f"{name} needs at least {min_models} models, got {arr.size}: the attack compares distributions over "
            "models, so train/unlearn with more seeds"
        )
    if np.isnan(arr).any():
        raise ValueError(
            f"{name} contains NaN: recompute s = log p_y - log(1 - p_y) from the logits (a diverged model gives "
            "NaN logits; p_y of exactly 0 or 1 is fine, it gives -inf/+inf, which are clipped)"
        )
    return np.clip(arr, -S_CLIP, S_CLIP)


def _stats_2d(values: ArrayLike, name: str, min_models: int = 2) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D with shape [models, forget examples], got shape {arr.shape}; for a single model "
            "use x[None, :], for a single example x[:, None]"
        )
    if arr.shape[0] < min_models:
        raise ValueError(
            f"{name} needs at least {min_models} models (rows), got {arr.shape[0]}: the audit compares "
            "distributions over models, so train/unlearn with more seeds"
        )
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no forget examples (0 columns)")
    if np.isnan(arr).any():
        bad = np.argwhere(np.isnan(arr))[:5].tolist()
        raise ValueError(
            f"{name} contains NaN (first [model, example] positions: {bad}): recompute s = log p_y - log(1 - p_y) "
            "from the logits (a diverged model gives NaN logits; p_y of exactly 0 or 1 is fine, it gives "
            "-inf/+inf, which are clipped)"
        )
    return np.clip(arr, -S_CLIP, S_CLIP)


def _check_delta(delta: float) -> float:
    # delta = 0 is refused: the "perfectly wrong rule" case (FPR = FNR = 1) would then give log(0) = -inf instead
    # of NaN on both sides, so the starter kit's NaN -> inf rule would not fire and a perfectly separable example
    # would score epsilon 0.
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta} (the challenge uses 1e-5)")
    return delta


def _check_binning(width: float, bins: int) -> tuple[float, int]:
    width = float(width)
    if not (math.isfinite(width) and width > 0.0):
        raise ValueError(f"width must be a positive finite number, got {width}")
    if int(bins) != bins or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins}")
    return width, int(bins)


def _accuracy_mean(values: ArrayLike, name: str) -> float:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: pass one accuracy per model (or a single mean)")
    if not np.isfinite(arr).all() or (arr < 0.0).any() or (arr > 1.0).any():
        raise ValueError(
            f"{name} must hold accuracies in [0, 1] (fractions, not percent), got {arr.tolist()[:5]}"
        )
    return float(arr.mean())


# ------------------------------------------------------------------------------------------ A: challenge score


def threshold_rates(u: ArrayLike, r: ArrayLike, two_sided: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """FPR and FNR of every threshold attack on one forget example.

    "Positive" means "this model was unlearned"; U holds the positives, R the negatives. The thresholds are one value
    below every sample followed by the sorted distinct pooled values t_1 < t_2 < ... For each t:

    * forward rule (the starter kit's), "unlearned if s > t": FPR = #{R > t} / K_r, FNR = #{U <= t} / K_u;
    * reversed rule (``two_sided=True`` only), "unlearned if s <= t": FPR' = #{R <= t} / K_r = 1 - FPR and
      FNR' = #{U > t} / K_u = 1 - FNR (computed from counts, so the rates are exact fractions).

    Args:
        u: s of the K_u >= 2 unlearned models on this example.
        r: s of the K_r >= 2 retrained models on this example.
        two_sided: add the reversed rule.

    Returns:
        ``(fpr, fnr)``, float arrays: the forward attacks in threshold order, then (two-sided) the reversed attacks
        in the same threshold order.
    """
    u = _stats_1d(u, "u (unlearned models)")
    r = _stats_1d(r, "r (retrained models)")
    pooled = np.unique(np.concatenate([u, r]))  # sorted, distinct
    thresholds = np.concatenate([[pooled[0] - 1.0], pooled])
    r_le = np.searchsorted(np.sort(r), thresholds, side="right")  # #{R <= t}
    u_le = np.searchsorted(np.sort(u), thresholds, side="right")  # #{U <= t}
    k_r, k_u = r.size, u.size
    fpr = (k_r - r_le) / k_r
    fnr = u_le / k_u
    if two_sided:
        fpr = np.concatenate([fpr, r_le / k_r])
        fnr = np.concatenate([fnr, (k_u - u_le) / k_u])
    return fpr, fnr


def epsilon_from_rates(fpr: ArrayLike, fnr: ArrayLike, delta: float = 1e-5) -> float:
    """The starter kit's ``compute_epsilon_s``: the worst (epsilon, delta) estimate over a family of attacks.

    Per attack:

    * FPR == 0 and FNR == 0: the attack separates the two groups perfectly, epsilon = inf;
    * exactly one of them is 0: discarded (one-sided, no finite estimate);
    * otherwise eps1 = log(1 - delta - FPR) - log(FNR), eps2 = log(1 - delta - FNR) - log(FPR); both NaN (logs of
      negatives, which needs FPR and FNR both > 1 - delta, i.e. both 1: the rule is perfectly wrong, so its
      opposite is perfectly right) gives inf, else the larger of the non-NaN ones.

    The result is the maximum over the attacks with 0 included, so an example whose attacks are all discarded or all
    negative gets 0.

    Raises:
        ValueError: lengths differ, a rate is outside [0, 1] or NaN, or delta is outside (0, 1).
    """
    fpr = np.asarray(fpr, dtype=np.float64).reshape(-1)
    fnr = np.asarray(fnr, dtype=np.float64).reshape(-1)
    if fpr.shape != fnr.shape:
        raise ValueError(f"fpr and fnr must have the same length, got {fpr.size} and {fnr.size}")
    for name, rates in (("fpr", fpr), ("fnr", fnr)):
        if np.isnan(rates).any() or (rates < 0.0).any() or (rates > 1.0).any():
            raise ValueError(f"{name} must hold rates in [0, 1] without NaN")
    delta = _check_delta(delta)

    both_zero = (fpr == 0.0) & (fnr == 0.0)
    kept = (fpr > 0.0) & (fnr > 0.0)
    candidates = [0.0]
    if both_zero.any():
        candidates.append(math.inf)
    if kept.any():
        p, n = fpr[kept], fnr[kept]
        with np.errstate(invalid="ignore", divide="ignore"):
            eps1 = np.log(1.0 - delta - p) - np.log(n)
            eps2 = np.log(1.0 - delta - n) - np.log(p)
        both_nan = np.isnan(eps1) & np.isnan(eps2)
        if both_nan.any():
            candidates.append(math.inf)
        if (~both_nan).any():
            candidates.append(float(np.nanmax(np.stack([eps1[~both_nan], eps2[~both_nan]]))))
    return float(max(candidates))


def example_epsilon(u: ArrayLike, r: ArrayLike, delta: float = 1e-5, two_sided: bool = True) -> float:
    """Epsilon of one forget example: :func:`epsilon_from_rates` over :func:`threshold_rates`.

    0 means no threshold attack does better than the (epsilon = 0, delta) guarantee allows; inf means some threshold
    separates the unlearned from the retrained models perfectly.
    """
    fpr, fnr = threshold_rates(u, r, two_sided=two_sided)
    return epsilon_from_rates(fpr, fnr, delta=delta)


def epsilon_bins(eps: ArrayLike, width: float = 0.5, bins: int = 13) -> np.ndarray:
    """The starter kit's ``bin_index_fn``: ``np.digitize(eps, np.arange(bins) * width)``, 1-based.

    With the defaults the edges are 0, 0.5, ..., 6.0: eps in [0, 0.5) is bin 1, [0.5, 1.0) bin 2, ..., [5.5, 6.0)
    bin 12 and everything >= 6.0, inf included, bin 13 (the cap).

    Raises:
        ValueError: an epsilon is NaN or negative (they are >= 0 by construction), or the binning is invalid.
    """
    width, bins = _check_binning(width, bins)
    arr = np.asarray(eps, dtype=np.float64)
    if np.isnan(arr).any() or (arr < 0.0).any():
        raise ValueError(
            "epsilons must be >= 0 and not NaN (use example_epsilon / challenge_score to compute them)"
        )
    return np.asarray(np.digitize(arr, np.arange(bins) * width), dtype=np.int64)


def forgetting_quality(eps: ArrayLike, width: float = 0.5, bins: int = 13) -> float:
    """The starter kit's ``F``: mean over the forget set of 2 / 2**bin; 1 is perfect, 2 / 2**bins the floor."""
    n = epsilon_bins(eps, width=width, bins=bins)
    if n.size == 0:
        raise ValueError("forgetting_quality needs at least one epsilon")
    return float(np.mean(2.0 / 2.0**n))


def _bin_labels(width: float, bins: int) -> list[str]:
    def fmt(x: float) -> str:
        return f"{x:.1f}" if abs(x * 10 - round(x * 10)) < 1e-9 else f"{x:g}"

    labels = [f"[{fmt(i * width)}, {fmt((i + 1) * width)})" for i in range(bins - 1)]
    labels.append(f">= {fmt((bins - 1) * width)}")
    return labels


def challenge_score(
    unlearned: ArrayLike,
    retrained: ArrayLike,
    retain_acc_u: ArrayLike,
    retain_acc_r: ArrayLike,
    test_acc_u: ArrayLike,
    test_acc_r: ArrayLike,
    delta: float = 1e-5,
    two_sided: bool = True,
    width: float = 0.5,
    bins: int = 13,
) -> dict:
    """The NeurIPS 2023 Machine Unlearning Challenge score (see the module docstring for the definition).

    Args:
        unlearned: s of the unlearned models, shape [K_u, N] (K_u >= 2 seeds, N forget examples).
        retrained: s of the retrained models, shape [K_r, N] (K_r >= 2), same example order.
        retain_acc_u, retain_acc_r, test_acc_u, test_acc_r: accuracies in [0, 1], one per model or a single mean;
            the ratios use the means (the starter kit had one retrained model, hence one value).
        delta: the delta of the (epsilon, delta) estimate.
        two_sided: also use the reversed threshold rule (False reproduces the starter kit's attacks).
        width, bins: the binning (the challenge's 0.5 and 13).

    Returns:
        A dict with ``epsilons`` [N] (float, inf allowed), ``bins`` [N] (int, 1-based), ``example_scores`` [N]
        (2 / 2**bin), ``F`` (their mean), ``retain_ratio`` and ``test_ratio`` (mean unlearned / mean retrained
        accuracy), ``score`` (F * retain_ratio * test_ratio), ``histogram`` (bin label -> number of examples, in bin
        order, e.g. ``"[0.0, 0.5)"`` ... ``">= 6.0"``), and the settings ``delta``, ``two_sided``, ``n_unlearned``,
        ``n_retrained``, ``n_examples``.

    Raises:
        ValueError: shapes disagree, fewer than 2 models on a side, NaN statistics, accuracies outside [0, 1], a
            retrained mean accuracy of 0, or invalid delta/binning.
    """
    u = _stats_2d(unlearned, "unlearned")
    r = _stats_2d(retrained, "retrained")
    if u.shape[1] != r.shape[1]:
        raise ValueError(
            f"unlearned and retrained must score the same forget examples: {u.shape[1]} vs {r.shape[1]} columns"
        )
    delta = _check_delta(delta)
    width, bins = _check_binning(width, bins)
    accs = {
        name: _accuracy_mean(value, name)
        for name, value in (
            ("retain_acc_u", retain_acc_u),
            ("retain_acc_r", retain_acc_r),
            ("test_acc_u", test_acc_u),
            ("test_acc_r", test_acc_r),
        )
    }
    for name in ("retain_acc_r", "test_acc_r"):
        if accs[name] == 0.0:
            raise ValueError(
                f"{name} averages to 0: the accuracy ratio is undefined (are these the right models?)"
            )

    epsilons = np.array(
        [example_epsilon(u[:, i], r[:, i], delta=delta, two_sided=two_sided) for i in range(u.shape[1])]
    )
    n = epsilon_bins(epsilons, width=width, bins=bins)
    example_scores = 2.0 / 2.0**n
    f = float(np.mean(example_scores))
    retain_ratio = accs["retain_acc_u"] / accs["retain_acc_r"]
    test_ratio = accs["test_acc_u"] / accs["test_acc_r"]
    counts = np.bincount(n, minlength=bins + 1)[1 : bins + 1]
    histogram = {label: int(c) for label, c in zip(_bin_labels(width, bins), counts)}
    return {
        "epsilons": epsilons,
        "bins": n,
        "example_scores": example_scores,
        "F": f,
        "retain_ratio": retain_ratio,
        "test_ratio": test_ratio,
        "score": f * retain_ratio * test_ratio,
        "histogram": histogram,
        "delta": delta,
        "two_sided": bool(two_sided),
        "n_unlearned": int(u.shape[0]),
        "n_retrained": int(r.shape[0]),
        "n_examples": int(u.shape[1]),
    }


# Why a forget example with epsilon > 0 is still told apart from retraining, in the order the rule checks them.
SEPARABLE_REASONS = ("near_boundary", "too_confident", "over_forgotten")


def separable_reasons(unlearned: ArrayLike, retrained: ArrayLike, epsilons: ArrayLike) -> list[str | None]:
    """Why each forget example with epsilon > 0 stays distinguishable from retraining, from the margins s alone.

    Per example, with s clipped as everywhere here, mu = median of the unlearned models' s, m = median of the
    retrained models' s, and [lo, hi] = the retrained models' range; s = 0 is p_y = 1/2 (s > 0 implies the model
    predicts the true label). The first rule that applies wins:

    1. ``None`` if epsilon == 0: no threshold attack does better than chance allows, nothing is left to forget.
    2. ``"near_boundary"`` if lo < 0 < hi, min(U) < 0 < max(U) and lo <= mu <= hi: the retrained models disagree
       about the example (p_y above 1/2 in some, below in others), so do the unlearned ones, and the unlearned
       median sits inside the retrained spread: the attack exploits a shift smaller than retraining's own
       seed-to-seed spread, on an example where models flip anyway. Checked first because there the direction of
       the shift says little.
    3. ``"too_confident"`` if mu > m (or, when the medians tie, mean(U) > mean(R)): the unlearned models are more
       confident in the true label than models that never saw the example: the method still remembers it.
    4. ``"over_forgotten"`` if mu < m (or, on tied medians, mean(U) < mean(R)): less confident than never having
       seen it, a membership signal of its own (pushed below the level of unseen data).
    5. ``"near_boundary"`` otherwise (medians and means both equal: the groups differ only in spread, there is no
       direction to name; it happens only with constructed or heavily tied values).

    Args:
        unlearned: s of the unlearned models, [K_u, N], K_u >= 2.
        retrained: s of the retrained models, [K_r, N], K_r >= 2, same example order.
        epsilons: the examples' epsilons [N] (:func:`challenge_score`'s ``epsilons``; inf allowed).

    Returns:
        One entry per example: ``None`` where epsilon is 0, else one of :data:`SEPARABLE_REASONS`.

    Raises:
        ValueError: shapes disagree, too few models, NaN statistics, or an epsilon that is NaN or negative.
    """
    u = _stats_2d(unlearned, "unlearned")
    r = _stats_2d(retrained, "retrained")
    eps = np.asarray(epsilons, dtype=np.float64).reshape(-1)
    if not (u.shape[1] == r.shape[1] == eps.size):
        raise ValueError(
            "unlearned, retrained and epsilons must cover the same forget examples: "
            f"{u.shape[1]}, {r.shape[1]} and {eps.size}"
        )
    if np.isnan(eps).any() or (eps < 0.0).any():
        raise ValueError("epsilons must be >= 0 and not NaN (use challenge_score to compute them)")
    mu, m = np.median(u, axis=0), np.median(r, axis=0)
    lo, hi = r.min(axis=0), r.max(axis=0)
    # both groups have models on each side of p_y = 1/2, and the unlearned median is inside the retrained range
    boundary = (
        (lo < 0.0) & (hi > 0.0) & (u.min(axis=0) < 0.0) & (u.max(axis=0) > 0.0) & (lo <= mu) & (mu <= hi)
    )
    # the direction of the shift: medians, and the means only where the medians tie exactly
    shift = np.where(mu != m, mu - m, u.mean(axis=0) - r.mean(axis=0))
    reasons: list[str | None] = []
    for i in range(eps.size):
        if eps[i] == 0.0:
            reasons.append(None)
        elif boundary[i]:
            reasons.append("near_boundary")
        elif shift[i] > 0.0:
            reasons.append("too_confident")
        elif shift[i] < 0.0:
            reasons.append("over_forgotten")
        else:
            reasons.append("near_boundary")  # no shift in level at all: only the spread differs
    return reasons


def level_or_spread(
    unlearned: ArrayLike,
    retrained: ArrayLike,
    delta: float = 1e-5,
    two_sided: bool = True,
    draws: int = 20,
    seed: int = 0,
    original: ArrayLike | None = None,
) -> dict:
    """How much of F the unlearned models' spread over seeds costs, and how many examples their level separates.

    K unlearnings of one original inherit that original's per-example s and vary little around it (only the
    unlearning's seed differs), while K retrainings differ in everything a training seed changes. Per example, s on
    each side is modelled as a Gaussian (median, standard deviation over that side's models), and F is computed, as
    :func:`challenge_score` does, on ``draws`` Monte Carlo draws of K_u models set against the measured retrained
    models, for each mix of level and spread:

    - ``f_unlearned``: the unlearned models' level and spread (checks the model: it should be near the measured F);
    - ``f_retrained_level``: retraining's level, their spread: F if every median were right, the cost of the
      spread alone;
    - ``f_retrained_spread``: their level, retraining's spread. With one-sided attacks (``two_sided=False``) a
      median *below* retraining's is not seen once the spread is retraining's (it can even score above
      ``f_retrained``), so this mix understates the level's cost there;
    - ``f_retrained``: both retraining's (this model's indistinguishable level).

    And per example, from the measured models: ``distinguishable`` (epsilon > 0), of which ``beyond_spread`` have
    the unlearned median more than one retrained standard deviation from the retrained median (told apart by
    level) and ``within_spread`` the others (told apart by how little the unlearned models vary). With ``original``
    (the original's own s per example, [N]), ``inherited_from_original`` counts the ``beyond_spread`` examples whose
    original s was already beyond that standard deviation on the same side (None without it).
    ``spread_ratio``: the mean over examples of the unlearned models' standard deviation of s over the retrained
    models' (1: they vary as much). s is clipped as everywhere here. The same seed gives the same draws, so two
    mixes with equal centres and scales give equal F.

    Raises:
        ValueError: shapes disagree, fewer than 2 models a side, NaN statistics, or draws < 1.
    """
    u = _stats_2d(unlearned, "unlearned")
    r = _stats_2d(retrained, "retrained")
    if u.shape[1] != r.shape[1]:
        raise ValueError(
            f"unlearned and retrained must cover the same forget examples: {u.shape[1]} and {r.shape[1]} columns"
        )
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    level = {"unlearned": np.median(u, axis=0), "retrained": np.median(r, axis=0)}
    spread = {"unlearned": u.std(axis=0, ddof=1), "retrained": r.std(axis=0, ddof=1)}

    def f(centre: np.ndarray, scale: np.ndarray) -> float:
        rng = np.random.default_rng(seed)  # the same draws for every mix: differences come from the mix alone
        scores = [
            challenge_score(centre + scale * rng.standard_normal(u.shape), r, 1, 1, 1, 1, delta, two_sided)[
                "F"
            ]
            for _ in range(draws)
        ]
        return float(np.mean(scores))

    eps = np.asarray(challenge_score(u, r, 1, 1, 1, 1, delta, two_sided)["epsilons"], dtype=float)
    shift = level["unlearned"] - level["retrained"]
    beyond = np.abs(shift) > spread["retrained"]
    inherited = None
    if original is not None:
        o = np.asarray(original, dtype=np.float64)
        if o.shape != (u.shape[1],) or np.isnan(o).any():
            raise ValueError(
                f"original must hold one s per forget example, shape ({u.shape[1]},), no NaN: got {o.shape}"
            )
        o_shift = np.clip(o, -S_CLIP, S_CLIP) - level["retrained"]
        already = (np.abs(o_shift) > spread["retrained"]) & (np.sign(o_shift) == np.sign(shift))
        inherited = int(np.sum((eps > 0) & beyond & already))
    return {
        "spread_ratio": float(spread["unlearned"].mean() / max(spread["retrained"].mean(), 1e-12)),
        "distinguishable": int(np.sum(eps > 0)),
        "beyond_spread": int(np.sum((eps > 0) & beyond)),
        "within_spread": int(np.sum((eps > 0) & ~beyond)),
        "inherited_from_original": inherited,
        "f_unlearned": f(level["unlearned"], spread["unlearned"]),
        "f_retrained_spread": f(level["unlearned"], spread["retrained"]),
        "f_retrained_level": f(level["retrained"], spread["unlearned"]),
        "f_retrained": f(level["retrained"], spread["retrained"]),
        "draws": draws,
    }


# ------------------------------------------------------------------------------------------------ B: LiRA


def auc(pos: ArrayLike, neg: ArrayLike) -> float:
    """P(a positive's score > a negative's score), ties counting 1/2 (the Mann-Whitney U statistic / (P * N)).

    Raises:
        ValueError: a side is empty or holds NaN.
    """
    p = np.asarray(pos, dtype=np.float64).reshape(-1)
    n = np.asarray(neg, dtype=np.float64).reshape(-1)
    for name, arr in (("pos", p), ("neg", n)):
        if arr.size == 0:
            raise ValueError(f"auc needs a non-empty {name}")
        if np.isnan(arr).any():
            raise ValueError(f"auc: {name} contains NaN")
    n_sorted = np.sort(n)
    below = np.searchsorted(n_sorted, p, side="left")  # #{neg < p}
    at_or_below = np.searchsorted(n_sorted, p, side="right")  # #{neg <= p}
    wins = below.sum() + 0.5 * (at_or_below - below).sum()
    return float(wins / (p.size * n.size))


def _resolve_fixed_variance(fixed_variance: bool | None, k_in: int, k_out: int) -> bool:
    if fixed_variance is None:
        return min(k_in, k_out) < LIRA_FIXED_VARIANCE_BELOW
    return bool(fixed_variance)


def _fit(ref: np.ndarray, fixed_variance: bool, min_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and standard deviation of reference models [K, N] (unbiased variance, floored sigma)."""
    mu = ref.mean(axis=0)
    var = ref.var(axis=0, ddof=1)
    if fixed_variance:
        var = np.full_like(var, var.mean())
    return mu, np.maximum(np.sqrt(var), min_sigma)


def _gauss_logpdf(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return -0.5 * np.log(2.0 * np.pi) - np.log(sigma) - 0.5 * ((x - mu) / sigma) ** 2


def lira_scores(
    targets: ArrayLike,
    inside: ArrayLike,
    outside: ArrayLike,
    fixed_variance: bool | None = None,
    min_sigma: float = LIRA_MIN_SIGMA,
) -> np.ndarray:
    """Per-example LiRA log-likelihood ratios Lambda = log N(t; mu_in, s_in^2) - log N(t; mu_out, s_out^2).

    Fits, per forget example i: mu_in_i / mu_out_i = the mean of s over the IN / OUT reference models; the variance
    either per example (unbiased, ddof = 1) or, with ``fixed_variance``, the mean over examples of those per-example
    variances (one value for IN, one for OUT). ``fixed_variance=None`` pools when either side has fewer than 64
    models, as Carlini et al. recommend. Sigmas are floored at ``min_sigma``.

    Differences from Carlini et al.'s reference code (``mi_lira_2021/plot.py``, ``generate_ours``): it uses the
    median for the means (we use the mean: with a handful of models the median of 2-4 values is no more robust and
    is coarser); ``np.std`` with ddof = 0 (we use ddof = 1, which matters when K is 2-8); and with fixed variance
    it takes ``np.std`` of *all* IN values together, which mixes in the spread of the means across examples, and
    uses that IN value for the OUT side too (we pool the within-example variance, separately per side). The
    reference code's ``score`` is -Lambda (negative log densities); the sign here makes "member" positive.

    Args:
        targets: s of the models under test, [T, N], or [N] for one model (then the result is [N]).
        inside: s of IN models (trained with the examples), [K_in, N], K_in >= 2.
        outside: s of OUT models (trained without them), [K_out, N], K_out >= 2.
        fixed_variance: pool the variance over examples; None = pool when min(K_in, K_out) < 64.
        min_sigma: floor on the fitted standard deviations (> 0).

    Returns:
        Lambda with the shape of ``targets``; > 0 means the target looks more like an IN model on that example.
    """
    t = np.asarray(targets, dtype=np.float64)
    one_model = t.ndim == 1
    t = _stats_2d(t[None, :] if one_model else t, "targets", min_models=1)
    ins = _stats_2d(inside, "inside (IN models)")
    outs = _stats_2d(outside, "outside (OUT models)")
    if not (t.shape[1] == ins.shape[1] == outs.shape[1]):
        raise ValueError(
            "targets, inside and outside must score the same forget examples: "
            f"{t.shape[1]}, {ins.shape[1]} and {outs.shape[1]} columns"
        )
    if not (math.isfinite(min_sigma) and min_sigma > 0.0):
        raise ValueError(f"min_sigma must be positive and finite, got {min_sigma}")
    fixed = _resolve_fixed_variance(fixed_variance, ins.shape[0], outs.shape[0])
    mu_in, sd_in = _fit(ins, fixed, min_sigma)
    mu_out, sd_out = _fit(outs, fixed, min_sigma)
    lam = _gauss_logpdf(t, mu_in, sd_in) - _gauss_logpdf(t, mu_out, sd_out)
    return lam[0] if one_model else lam


def lira_audit(
    unlearned: ArrayLike,
    retrained: ArrayLike,
    inside: ArrayLike,
    fixed_variance: bool | None = None,
    min_sigma: float = LIRA_MIN_SIGMA,
) -> dict:
    """Do unlearned models look like members of the forget set where retrained models do not?

    * Each unlearned model is scored with the OUT fit on all K_r retrained models.
    * Each retrained model is scored with a leave-one-out OUT fit on the *other* K_r - 1 retrained models, so it is
      never scored against a distribution it is part of (that would pull its Lambda towards "non-member" and make
      the comparison unfair to the unlearned models). An unbiased variance from K_r - 1 values needs K_r >= 3.
    * ``fixed_variance`` is resolved once, from min(K_in, K_r - 1) < 64 when None, and used for both groups, so that
      both are scored the same way.

    The retrained models' Lambdas are the null distribution: what a perfect unlearning method's would look like
    (their OUT fit has one model fewer; with small K_r this makes their Lambdas slightly more spread out).

    Args:
        unlearned: s of the unlearned models, [K_u, N], K_u >= 1.
        retrained: s of the retrained models (OUT), [K_r, N], K_r >= 3.
        inside: s of IN models, e.g. originals trained with the forget set from several seeds, [K_in, N], K_in >= 2.
        fixed_variance, min_sigma: as in :func:`lira_scores`.

    Returns:
        A dict with ``lambda_unlearned`` [K_u, N], ``lambda_retrained`` [K_r, N], ``member_rate_unlearned`` and
        ``member_rate_retrained`` (fraction of (model, example) pairs with Lambda > 0), ``mean_lambda_unlearned``,
        ``mean_lambda_retrained``, ``auc`` (P(an unlearned pair's Lambda > a retrained pair's), ties 1/2: 0.5 =
        indistinguishable from retraining, 1.0 = the unlearned models still look trained on the examples, below 0.5 =
        they look *less* like members than retrained models, i.e. over-forgetting), ``per_example_lambda_unlearned``
        and ``per_example_lambda_retrained`` [N] (means over models), ``worst_examples`` [N] (example indices by
        decreasing mean unlearned Lambda, ties in index order), ``fixed_variance`` (as resolved) and the counts
        ``n_unlearned``, ``n_retrained``, ``n_inside``, ``n_examples``.

    Raises:
        ValueError: shapes disagree, too few models, NaN statistics.
    """
    u = _stats_2d(unlearned, "unlearned", min_models=1)
    r = _stats_2d(retrained, "retrained", min_models=3)
    ins = _stats_2d(inside, "inside (IN models)")
    if not (u.shape[1] == r.shape[1] == ins.shape[1]):
        raise ValueError(
            "unlearned, retrained and inside must score the same forget examples: "
            f"{u.shape[1]}, {r.shape[1]} and {ins.shape[1]} columns"
        )
    k_r = r.shape[0]
    fixed = _resolve_fixed_variance(fixed_variance, ins.shape[0], k_r - 1)

    lam_u = lira_scores(u, ins, r, fixed_variance=fixed, min_sigma=min_sigma)
    lam_r = np.empty_like(r)
    for k in range(k_r):
        others = np.delete(r, k, axis=0)
        lam_r[k] = lira_scores(r[k], ins, others, fixed_variance=fixed, min_sigma=min_sigma)

    per_example_u = lam_u.mean(axis=0)
    return {
        "lambda_unlearned": lam_u,
        "lambda_retrained": lam_r,
        "member_rate_unlearned": float(np.mean(lam_u > 0.0)),
        "member_rate_retrained": float(np.mean(lam_r > 0.0)),
        "mean_lambda_unlearned": float(lam_u.mean()),
        "mean_lambda_retrained": float(lam_r.mean()),
        "auc": auc(lam_u, lam_r),
        "per_example_lambda_unlearned": per_example_u,
        "per_example_lambda_retrained": lam_r.mean(axis=0),
        "worst_examples": np.argsort(-per_example_u, kind="stable"),
        "fixed_variance": fixed,
        "n_unlearned": int(u.shape[0]),
        "n_retrained": int(k_r),
        "n_inside": int(ins.shape[0]),
        "n_examples": int(u.shape[1]),
    }
