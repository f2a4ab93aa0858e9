"""`unlearn audit`'s audit.md and its histogram of per-example epsilons, from what audit.json holds
(engine/eval/audit.py), drawn as the run reports are (engine/eval/report.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from engine.eval.report import fmt, md_table

__all__ = ["REASON_MEANINGS", "plot_epsilons", "render", "render_level_or_spread"]


def plot_epsilons(path: Path, result: dict) -> None:
    hist = result["epsilon_histogram"]
    fig = Figure(figsize=(7.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(hist)), list(hist.values()), color="tab:red")
    ax.bar_label(bars, fontsize=7)
    ax.set_xticks(range(len(hist)), list(hist), rotation=45, ha="right", fontsize=7)
    ax.set_xlabel(f"per-example epsilon (delta = {result['delta']:g})")
    ax.set_ylabel("forget examples")
    ax.set_title(f"{result['method']['name']}: score {result['score']:.4f}, K={result['k']}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


# audit.md's one-line reading of each separable_reasons() reason (engine/eval/audit.py has the rule)
REASON_MEANINGS = {
    "near_boundary": "retrained and unlearned models both put it on either side of p_y = 1/2 and the shift is "
    "within retraining's spread: a hard example, often attack noise at small K",
    "too_confident": "unlearned models more confident than retrained ones: still remembered, unlearn harder "
    "(o_margin says whether the Original was already there)",
    "over_forgotten": "unlearned models less confident than retrained ones: forgotten too far, itself a "
    "membership signal; unlearn more gently (unless the Original was already there: o_margin)",
}


def render_level_or_spread(ls: dict, measured_f: float, two_sided: bool) -> list[str]:
    """audit.md's reading of level_or_spread(): what the spread costs F, and how many examples the level separates."""
    caveat = (
        " With the one-sided attacks used here a median below retraining's is not seen once the spread is "
        "retraining's, so the row of their level with retraining's spread understates what the level costs."
    ) if not two_sided else ""  # fmt: skip
    f3 = lambda x: fmt(x, ".3f")  # noqa: E731
    table = md_table(["level", "spread", "F", "what it says"], [
        ["unlearned", "unlearned", f3(ls["f_unlearned"]), f"the model of the measured F ({f3(measured_f)})"],
        ["retrained", "unlearned", f3(ls["f_retrained_level"]), "every median right: the cost of the spread alone"],
        ["unlearned", "retrained", f3(ls["f_retrained_spread"]), "if the unlearned models varied as retraining does"],
        ["retrained", "retrained", f3(ls["f_retrained"]), "indistinguishable, in this model"]])  # fmt: skip
    out = [
        "### Level or spread",
        "",
        f"The unlearned models' s varies {fmt(ls['spread_ratio'], '.2f')}x as much over seeds as the retrained "
        "models' (mean per-example standard deviation): K unlearnings of one original inherit its per-example s, "
        "K retrainings differ in everything a seed changes. F with each side's per-example median and spread as "
        f"Gaussians ({ls['draws']} draws of K models, scored against the measured retrained models):",
        "",
        *table,
        "",
        f"Of the {ls['distinguishable']} examples with epsilon > 0, {ls['beyond_spread']} have the unlearned median "
        "more than one retrained standard deviation from the retrained median (told apart by level, in the "
        f"direction the reasons above give) and {ls['within_spread']} within it (told apart by how little the "
        f"unlearned models vary).{caveat}",
        "",
    ]
    if ls.get("inherited_from_original") is not None:
        out += [
            f"Of those {ls['beyond_spread']} told apart by level, {ls['inherited_from_original']} were already there "
            "before unlearning: the Original's own s (`examples[].o_margin`) lies beyond one retrained standard "
            "deviation on the same side, and unlearning did not bring them back within retraining's spread.",
            "",
        ]
    if ls.get("f_trained_on_d") is not None:
        out += [
            f"For scale: the K models trained on D from their own seeds, which forget nothing but vary as training "
            f"does, score F = {fmt(ls['f_trained_on_d'], '.3f')} against the same retrained models.",
            "",
        ]
    return out


def render(r: dict) -> str:
    u, rt, s, d = r["utility"]["unlearned"], r["utility"]["retrained"], r["seconds"], r["distinguishable"]
    score = md_table(["score", "forgetting quality F", "retain accuracy ratio", "test accuracy ratio"], [
        [fmt(r["score"], ".4f"), fmt(r["forgetting_quality"], ".4f"), fmt(r["retain_ratio"], ".3f"),
         fmt(r["test_ratio"], ".3f")]])  # fmt: skip
    utility = md_table(["side", "forget acc", "retain acc", "test acc"], [
        [name, fmt(100 * x["forget_acc"]), fmt(100 * x["retain_acc"]), fmt(100 * x["test_acc"])]
        for name, x in (("unlearned", u), ("retrained", rt))])  # fmt: skip
    worst = md_table(["id", "epsilon", "reason", "median s unlearned", "median s retrained", "mean s unlearned",
                      "mean s retrained", "LiRA (mean log-ratio, unlearned)"], [
        [w["id"], "inf" if w["separable"] else fmt(w["epsilon"]), w["reason"] or "-",  # fmt() dashes infinities
         *(fmt(w[k]) for k in ("u_margin_median", "r_margin_median", "s_unlearned_mean", "s_retrained_mean",
                               "lira_unlearned_mean"))]
        for w in r["worst"]])  # fmt: skip
    out = [
        f"# Audit: {r['method']['name']} on {r['forget']['description']}",
        "",
        f"K = {r['k']} unlearnings of `{r['model_path']}` and K retrained references (seeds {r['seeds'][0]}.."
        f"{r['seeds'][-1]}), scored per forget example ({r['forget']['size']} examples, ids sha256 "
        f"`{r['forget']['ids_sha256'][:16]}`) as the NeurIPS 2023 Machine Unlearning Challenge does.",
        "",
        "## Score",
        "",
        *score,
        "",
        "F = mean over forget examples of 2 / 2^n, n = the bin (width 0.5) of the example's epsilon: the best "
        "threshold attack on s = log p_y - log(1 - p_y), unlearned vs retrained models, with "
        f"delta = {r['delta']:g}{' (both threshold directions)' if r['two_sided'] else ''}. 2/2^13 = perfectly "
        "separable. Even models indistinguishable from retrained ones do not reach 1 (the score is the best of "
        f"many noisy attacks): at K = {r['k']} that level is F = {fmt(r['null_forgetting_quality'], '.3f')}. "
        "Ratios: unlearned / retrained mean accuracy.",
        "",
        "## Utility (mean over the K models of each side, %)",
        "",
        *utility,
        "",
        "## Per-example epsilon",
        "",
        "![epsilon histogram](epsilon_histogram.png)",
        "",
        *md_table(["epsilon bin", "examples"], [[b, n] for b, n in r["epsilon_histogram"].items()]),
        "",
        "### What is left to forget",
        "",
        f"{d['count']} of {len(r['examples'])} forget examples have epsilon > 0 (some threshold attack tells the "
        f"unlearned models from the retrained ones; {d['perfectly_separable']} perfectly). Why, from the medians of "
        "s over each side's K models:",
        "",
        *md_table(
            ["reason", "examples", "meaning"], [[n, k, REASON_MEANINGS[n]] for n, k in d["by_reason"].items()]
        ),
        "",
        *render_level_or_spread(r["level_or_spread"], r["forgetting_quality"], r["two_sided"]),
        f"### The {len(r['worst'])} worst examples",
        "",
        *worst,
        "",
    ]
    if r["lira"]:
        lira = r["lira"]
        table = md_table(["AUC unlearned vs retrained", "called member: unlearned", "called member: retrained"], [
            [fmt(lira.get("auc"), ".3f"), fmt(100 * lira["member_rate_unlearned"], ".1f") + "%",
             fmt(100 * lira["member_rate_retrained"], ".1f") + "%"]])  # fmt: skip
        out += [
            "## LiRA",
            "",
            "Per forget example, Gaussians fitted to s of K models trained WITH it (on D) and K without (the "
            "retrained references); each model's log-likelihood ratio (> 0: looks trained on the example). "
            "Retrained models are scored leave-one-out. AUC = chance that an unlearned model's ratio exceeds a "
            "retrained one's: 0.5 = indistinguishable from retraining.",
            "",
            *table,
            "",
        ]
    times = md_table(["models", "mean seconds", "min", "max"], [
        [name, fmt(np.mean(v), ".1f"), fmt(min(v), ".1f"), fmt(max(v), ".1f")] for name, v in s["per_model"].items()
    ])  # fmt: skip
    out += [
        "## Run times",
        "",
        *times,
        "",
        f"Unlearning takes {fmt(s['unlearn_vs_retrain'], '.3f')} of retraining's time (training loops only). "
        f"Ray tasks: {fmt(s['tasks_wall'], '.1f')} s wall; whole audit {fmt(s['total'], '.1f')} s. References: "
        f"{r['cache']['reused']} reused, {r['cache']['trained']} trained, in `{r['cache']['dir']}`.",
        "",
    ]
    return "\n".join(out)
