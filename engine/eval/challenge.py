"""Many-model unlearning audits: the NeurIPS 2023 challenge's forgetting score (numpy only); the LiRA-style attack
is engine/eval/lira.py, the audit's diagnostics engine/eval/audit.py.

Both audits compare *distributions over models*: many unlearned models (one unlearning run per seed) against many
models retrained from scratch without the forget set. The caller computes, once per model and forget example, the
logit-scaled confidence on the true label,

    s = log p_y - log(1 - p_y)        (from logits: logit_y - logsumexp(logits without y)),

and hands over matrices of shape [K models, N forget examples]. No model or tensor library is involved here.

:func:`challenge_score`: the NeurIPS 2023 Machine Unlearning Challenge's score (Triantafillou et al., 2024,
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
5. Diagnostic, not part of the score (engine/eval/audit.py): ``separable_reasons`` says, per example with
   epsilon > 0, whether the unlearned models are too confident, over-forgotten, or only differ near the decision
   boundary; and ``level_or_spread`` what the unlearned models' spread over seeds costs F, and how many examples
   their level separates.

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
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "S_CLIP",
    "challenge_score",
    "epsilon_bins",
    "epsilon_from_rates",
    "example_epsilon",
    "forgetting_quality",
    "stats_2d",
    "threshold_rates",
]

# s = log p - log(1 - p) is +inf when a float32 softmax rounds p_y to 1 and -inf when it rounds it to 0. Infinite
# values break the "one threshold below every sample" (min - 1 = -inf) and the Gaussian fits (inf - inf = NaN), so
# they are clipped. 1e4 is far outside anything a finite logit margin produces in practice, so the clip only ever
# acts on the infinities, and it keeps their order (all +inf stay tied at the top, all -inf at the bottom).
S_CLIP = 1e4


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


def stats_2d(values: ArrayLike, name: str, min_models: int = 2) -> np.ndarray:
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
    u = stats_2d(unlearned, "unlearned")
    r = stats_2d(retrained, "retrained")
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
