"""A LiRA-style audit of many unlearned models (numpy only), on the margins s of engine/eval/challenge.py.

:func:`lira_audit`: a per-example likelihood-ratio attack after Carlini et al. (2022), "Membership inference
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

from engine.eval.challenge import stats_2d

__all__ = ["auc", "lira_audit", "lira_scores"]

# Carlini et al. recommend one variance shared by all examples when there are fewer than 64 reference models: a
# per-example variance from a handful of values is too noisy and makes Lambda explode where it happens to be tiny.
LIRA_FIXED_VARIANCE_BELOW = 64

# Floor on a fitted standard deviation (logit units). A statistic that is identical in every reference model (the
# same clipped +-inf, or deterministic training) has variance 0 and log N(.) would divide by zero. Seed-to-seed spread
# of s is typically 0.1-1 or more, so 1e-3 acts only on such degenerate examples.
LIRA_MIN_SIGMA = 1e-3


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
    t = stats_2d(t[None, :] if one_model else t, "targets", min_models=1)
    ins = stats_2d(inside, "inside (IN models)")
    outs = stats_2d(outside, "outside (OUT models)")
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
    u = stats_2d(unlearned, "unlearned", min_models=1)
    r = stats_2d(retrained, "retrained", min_models=3)
    ins = stats_2d(inside, "inside (IN models)")
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
