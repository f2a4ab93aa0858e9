"""The statistics of `unlearn audit` (engine/recipes/audit.py runs it), from the per-model, per-forget-example
margins s (engine/eval/challenge.py): the challenge's score and the LiRA audit put together (``score``, what
audit.json holds), and the diagnostics beside them, not part of the score: why an example stays distinguishable
from retraining (``separable_reasons``), whether F is lost to the unlearned models' level or to their spread over
seeds (``level_or_spread``), and the F that models indistinguishable from retrained ones reach
(``null_forgetting_quality``). numpy only; audit.md is drawn by engine/eval/audit_report.py."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from engine.eval.challenge import S_CLIP, challenge_score, example_epsilon, forgetting_quality, stats_2d
from engine.eval.lira import lira_audit

__all__ = ["SEPARABLE_REASONS", "level_or_spread", "null_forgetting_quality", "score", "separable_reasons"]


def score(models: dict, seeds: list[int], kinds: list[str], ids: list, a, original=None) -> dict:
    """Everything audit.json reports, from the per-model statistics (``original``: the Original's s per forget
    example, if known)."""

    def side(kind):
        return [models[(kind, s)] for s in seeds]

    unlearned, retrained = side("unlearn"), side("retrain")
    U = np.array([m["margin"] for m in unlearned])
    R = np.array([m["margin"] for m in retrained])
    mean = lambda ms, k: float(np.mean([m[k] for m in ms]))  # noqa: E731
    accuracies = [mean(ms, k) for k in ("retain_acc", "test_acc") for ms in (unlearned, retrained)]
    c = challenge_score(U, R, *accuracies, delta=a.delta, two_sided=a.two_sided)
    eps = np.asarray(c["epsilons"], dtype=float)
    # why an example with epsilon > 0 is still told apart (None: it is not), and the numbers the rule used: the
    # margins clipped as the rule clips them, which also keeps them finite for JSON
    reasons = separable_reasons(U, R, eps)
    u_clip, r_clip = np.clip(U, -S_CLIP, S_CLIP), np.clip(R, -S_CLIP, S_CLIP)
    u_med, r_med = np.median(u_clip, 0), np.median(r_clip, 0)
    r_min, r_max = r_clip.min(0), r_clip.max(0)
    u_std, r_std = u_clip.std(0, ddof=1), r_clip.std(0, ddof=1)
    o_clip = None if original is None else np.clip(np.asarray(original, dtype=float), -S_CLIP, S_CLIP)

    def diagnosis(i: int, **more) -> dict:
        return {
            "id": ids[i],
            "epsilon": float(eps[i]),  # JSON null when infinite: see "separable"
            "separable": bool(np.isinf(eps[i])),
            "bin": int(c["bins"][i]),
            **more,
            "reason": reasons[i],
            "u_margin_median": float(u_med[i]),
            "r_margin_median": float(r_med[i]),
            "r_margin_min": float(r_min[i]),
            "r_margin_max": float(r_max[i]),
            "u_margin_std": float(u_std[i]),
            "r_margin_std": float(r_std[i]),
            "o_margin": None if o_clip is None else float(o_clip[i]),
        }

    gap = np.abs(U.mean(0) - R.mean(0))  # among equal epsilons (e.g. all separable), the farthest apart first
    order = sorted(range(len(ids)), key=lambda i: (-eps[i], -gap[i], i))[: a.worst]
    lira, f_trained_on_d = None, None
    if "original" in kinds:
        inside = np.array([m["margin"] for m in side("original")])
        lira = lira_audit(U, R, inside)
        # forgetting nothing, with a training seed's spread: the K models trained on D against the retrained ones
        f_trained_on_d = challenge_score(inside, R, 1, 1, 1, 1, a.delta, a.two_sided)["F"]
    per_example_lira = None if lira is None else np.asarray(lira["per_example_lambda_unlearned"], dtype=float)
    worst = [
        diagnosis(i, s_unlearned_mean=float(U[:, i].mean()), s_retrained_mean=float(R[:, i].mean()),
                  lira_unlearned_mean=None if per_example_lira is None else float(per_example_lira[i]))
        for i in order
    ]  # fmt: skip
    utility = {
        name: {k: mean(ms, k) for k in ("forget_acc", "retain_acc", "test_acc")}
        for name, ms in (("unlearned", unlearned), ("retrained", retrained))
    }
    times = {name: [m["seconds"] for m in side(name)] for name in kinds + ["unlearn"]}
    return {
        "k": len(seeds),
        "seeds": seeds,
        "delta": a.delta,
        "score": c["score"],
        "forgetting_quality": c["F"],
        "retain_ratio": c["retain_ratio"],
        "test_ratio": c["test_ratio"],
        "epsilon_histogram": c["histogram"],
        "examples": [diagnosis(i) for i in range(len(ids))],
        # epsilon > 0: some threshold attack tells the unlearned models from the retrained ones on the example
        # ("perfectly_separable" counts the examples[].separable ones, epsilon infinite, a subset)
        "distinguishable": {
            "count": int(np.sum(eps > 0)),
            "perfectly_separable": int(np.sum(np.isinf(eps))),
            "by_reason": {name: reasons.count(name) for name in SEPARABLE_REASONS},
        },
        # is F lost to the per-example level of s or to how little the unlearnings of one original vary?
        "level_or_spread": {
            **level_or_spread(U, R, a.delta, a.two_sided, original=original),
            "f_trained_on_d": f_trained_on_d,
        },
        "worst": worst,
        "utility": utility,
        "null_forgetting_quality": null_forgetting_quality(len(seeds), len(seeds), a.delta, a.two_sided),
        "two_sided": a.two_sided,
        "lira": None
        if lira is None
        else {k: v for k, v in lira.items() if k not in ("lambda_unlearned", "lambda_retrained")},
        "seconds": {
            "per_model": times,
            "unlearn_mean": float(np.mean(times["unlearn"])),
            "retrain_mean": float(np.mean(times["retrain"])),
            "unlearn_vs_retrain": float(np.mean(times["unlearn"]) / max(np.mean(times["retrain"]), 1e-9)),
        },
    }


def null_forgetting_quality(k_u: int, k_r: int, delta: float, two_sided: bool, n: int = 2000) -> float:
    """F when the unlearned models are indistinguishable from retrained ones, at this K: the attacks see only
    the ranks of the 2K values, which are a uniformly random order under that hypothesis (continuous s), so
    Gaussian draws give the level for any data. The score is a maximum over noisy attacks: well below 1."""
    rng = np.random.default_rng(0)
    draws = rng.standard_normal((n, k_u + k_r))
    eps = [example_epsilon(d[:k_u], d[k_u:], delta=delta, two_sided=two_sided) for d in draws]
    return forgetting_quality(np.asarray(eps))


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
    u = stats_2d(unlearned, "unlearned")
    r = stats_2d(retrained, "retrained")
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
    u = stats_2d(unlearned, "unlearned")
    r = stats_2d(retrained, "retrained")
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
