"""`unlearn audit`: the NeurIPS 2023 Machine Unlearning Challenge's evaluation as one command.

Reads top to bottom: check inputs -> find cached references -> one Ray task per model still to make
(K retrained references on D_r, K models on D for LiRA, K unlearnings of model.path with seeds
audit.seed + i) -> per forget example, the statistic s = log p_y - log(1 - p_y) of every model ->
epsilon per example, the challenge score, LiRA -> ``audit.json``, ``audit.md`` and a histogram plot.

References are trained from scratch with ``cfg.train`` (the recipe `unlearn train` made the Original
with), so model.arch must be set. They depend on the data, the forget set and that recipe, not on the
method: they are cached under ``audit.cache_dir`` and a second audit (another method) reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from engine.config import RunConfig
from engine.errors import ConfigError
from engine.eval.report import fmt, md_table
from engine.io import json_safe, write_text_atomic
from engine.recipes.session import Session

# kind -> (`unlearn train` target it runs, what it is)
REFERENCES = {"retrain": ("retrain", "trained on D_r"), "original": ("original", "trained on D (LiRA's IN)")}


def _absolute(spec: str) -> str:
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec  # a hub id stays as given


def reference_key(cfg: RunConfig, forget: dict) -> tuple[str, dict]:
    """What a reference model depends on: data, forget (and given retain) set, architecture and recipe."""
    recipe = {
        "data": {**cfg.data.model_dump(mode="json"), "dataset": _absolute(cfg.data.dataset)},
        "forget_ids_sha256": forget["ids_sha256"],
        "retain_ids_sha256": forget.get("retain_ids_sha256"),
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "train": cfg.train.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16], recipe


def _task(item: dict) -> dict:
    """One model (a Ray task): make it, then score it on the forget set. Runs in a worker process."""
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    from engine.data.vision import prepare_data
    from engine.recipes.train import run_training
    from engine.recipes.unlearn import run_unlearning

    hf_logging.disable_progress_bar()  # a task's output reaches the driver's console: no per-file bars
    datasets.disable_progress_bars()
    os.chdir(item["cwd"])  # relative paths of the config resolve as on the driver
    torch.set_num_threads(1)  # one CPU per task
    cfg = RunConfig.model_validate(item["cfg"])
    kind = item["kind"]
    quiet = lambda _msg: None  # noqa: E731  (the audit logs per model, not per epoch)
    if kind == "unlearn":
        out = run_unlearning(cfg, log=quiet)
        report = json.loads((out / "report.json").read_text())
        rewound = report.get("rewound")  # an earlier epoch the method chose (SCRUB+R): the model it audits
        model_dir = out / ("model_rewound" if rewound else "model")
        metrics = rewound["metrics"] if rewound else report["metrics"]
    else:
        target = REFERENCES[kind][0]
        out = run_training(cfg, targets=(target,), log=quiet)
        model_dir = out / target
        report = json.loads((model_dir / "report.json").read_text())
        metrics = report["metrics"]
    data = prepare_data(cfg.data, cfg.forget)
    stats = {
        "kind": kind,
        "seed": cfg.seed,
        "model": str(model_dir),
        "forget_ids": list(data.forget.ids),
        "margin": forget_margins(cfg, data, str(model_dir)).tolist(),
        "forget_acc": 1 - metrics["forget_error"] / 100,
        "retain_acc": 1 - metrics["retain_error"] / 100,
        "test_acc": 1 - metrics["test_error"] / 100,
        "seconds": report["train_seconds"],
    }
    if kind != "unlearn":  # the cache entry is complete only once its stats exist
        write_text_atomic(Path(cfg.output_dir) / "stats.json", json.dumps(json_safe(stats)))
    return stats


def forget_margins(cfg: RunConfig, data, model_dir: str) -> np.ndarray:
    """s = log p_y - log(1 - p_y) of the classifier in ``model_dir`` on each forget example (eval mode, CPU)."""
    from engine.eval.metrics import predict
    from engine.models.loading import load_classifier
    from engine.tasks.image_classification import load_data_and_transform

    _, _, transform = load_data_and_transform(cfg, model_dir)
    model = load_classifier(model_dir, data.num_labels)
    return predict(model, data.forget, transform, cfg.eval.batch_size, "cpu")["margin"].astype(float)


def _item(cfg: RunConfig, kind: str, seed: int, output_dir: Path) -> dict:
    """One task: the config of one model, quiet, and evaluated only at the end (SCRUB+R and SCRUB's calibrated
    schedule excepted: they pick an epoch, or decide the next one's max-steps, from per-epoch errors)."""
    per_epoch = kind == "unlearn" and cfg.method.every_epoch_reason() is not None
    run_cfg = cfg.model_copy(
        update={
            "seed": seed,
            "output_dir": str(output_dir),
            "overwrite": True,
            "logging": cfg.logging.model_copy(update={"progress": False, "wandb": False}),
            "eval": cfg.eval.model_copy(update={"reference": None, "every_epoch": bool(per_epoch)}),
        }
    )
    return {"kind": kind, "seed": seed, "cwd": os.getcwd(), "cfg": run_cfg.model_dump(mode="json")}


def run_audit(cfg: RunConfig, log=print) -> Path:
    from engine.data.vision import prepare_data

    t_start = time.perf_counter()
    a = cfg.audit
    session = Session(cfg, "audit", log, with_backend=False)  # its models train in Ray tasks of their own
    log = session.log
    data = prepare_data(cfg.data, cfg.forget)
    key, recipe = reference_key(cfg, data.forget_summary())
    cache = Path(a.cache_dir or Path(cfg.model.path).resolve().parent / "audit_references") / key
    cache.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache / "recipe.json", json.dumps(recipe, indent=2))
    seeds = [a.seed + i for i in range(a.k)]
    lira = a.lira and a.k >= 3  # a retrained model is scored by the other K-1: a variance needs two
    kinds = ["retrain"] + (["original"] if lira else [])
    if a.lira and not lira:
        log("LiRA skipped: it needs audit.k >= 3 (each retrained model is scored against the other K-1)")
    log(
        f"audit of {cfg.method.name} on {data.description} ({len(data.forget)} forget examples): K={a.k} "
        f"per side, seeds {seeds[0]}..{seeds[-1]}; references in {cache}"
    )

    with session.stage() as stage:
        cached, items = {}, []
        for kind in kinds:
            for s in seeds:
                folder = cache / f"{kind}_seed{s}"
                if (folder / "stats.json").is_file():
                    cached[(kind, s)] = json.loads((folder / "stats.json").read_text())
                else:
                    items.append(_item(cfg, kind, s, folder))
        items += [_item(cfg, "unlearn", s, stage / "unlearned" / f"seed_{s}") for s in seeds]
        log(f"{len(cached)} references reused from the cache, {len(items)} models to make as Ray tasks")
        from engine.launch.ray_tasks import fan_out

        t_tasks = time.perf_counter()
        made = fan_out(_task, items, num_cpus=a.num_cpus, address=a.ray_address)
        tasks_seconds = time.perf_counter() - t_tasks
        models = {(m["kind"], m["seed"]): m for m in made} | cached
        for m in models.values():
            if m["forget_ids"] != list(data.forget.ids):
                raise ConfigError(f"{m['model']} was scored on another forget set; delete {cache} and rerun")
        # the Original's own s: whether what separates the unlearned models was already there before unlearning
        original = forget_margins(cfg, data, str(cfg.model.path))
        result = score(models, seeds, kinds, data.forget.ids, a, original)
        result.update(
            method=cfg.method.model_dump(mode="json"),
            forget=data.forget_summary(),
            model_path=cfg.model.path,
            cache={"dir": str(cache), "reused": len(cached), "trained": len(items) - a.k},
            seconds={
                "tasks_wall": tasks_seconds,
                "total": time.perf_counter() - t_start,
                **result["seconds"],
            },
        )
        write_text_atomic(stage / "audit.json", json.dumps(json_safe(result), indent=2))
        plot_epsilons(stage / "epsilon_histogram.png", result)
        write_text_atomic(stage / "audit.md", render(result))
    out = session.close()
    log(
        f"score {result['score']:.4f} (forgetting quality {result['forgetting_quality']:.4f} x retain ratio "
        f"{result['retain_ratio']:.3f} x test ratio {result['test_ratio']:.3f}); report in {out / 'audit.md'}"
    )
    return out


def score(models: dict, seeds: list[int], kinds: list[str], ids: list, a, original=None) -> dict:
    """Everything audit.json reports, from the per-model statistics (``original``: the Original's s per forget
    example, if known)."""
    from engine.eval.challenge import (
        S_CLIP,
        SEPARABLE_REASONS,
        challenge_score,
        level_or_spread,
        lira_audit,
        separable_reasons,
    )

    def side(kind):
        return [models[(kind, s)] for s in seeds]

    unlearned, retrained = side("unlearn"), side("retrain")
    U = np.array([m["margin"] for m in unlearned])
    R = np.array([m["margin"] for m in retrained])
    mean = lambda ms, k: float(np.mean([m[k] for m in ms]))  # noqa: E731
    c = challenge_score(
        U,
        R,
        mean(unlearned, "retain_acc"),
        mean(retrained, "retain_acc"),
        mean(unlearned, "test_acc"),
        mean(retrained, "test_acc"),
        delta=a.delta,
        two_sided=a.two_sided,
    )
    eps = np.asarray(c["epsilons"], dtype=float)
    # why an example with epsilon > 0 is still told apart (None: it is not), and the numbers the rule used: the
    # margins clipped as the rule clips them, which also keeps them finite for JSON
    reasons = separable_reasons(U, R, eps)
    u_clip, r_clip = np.clip(U, -S_CLIP, S_CLIP), np.clip(R, -S_CLIP, S_CLIP)
    u_med, r_med = np.median(u_clip, 0), np.median(r_clip, 0)
    r_min, r_max = r_clip.min(0), r_clip.max(0)
    u_std, r_std = u_clip.std(0, ddof=1), r_clip.std(0, ddof=1)
    o_clip = None if original is None else np.clip(np.asarray(original, dtype=float), -S_CLIP, S_CLIP)

    def diagnosis(i: int) -> dict:
        return {
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
        {
            "id": ids[i],
            "epsilon": float(eps[i]),  # JSON null when infinite: see "separable"
            "separable": bool(np.isinf(eps[i])),
            "bin": int(c["bins"][i]),
            "s_unlearned_mean": float(U[:, i].mean()),
            "s_retrained_mean": float(R[:, i].mean()),
            "lira_unlearned_mean": None if per_example_lira is None else float(per_example_lira[i]),
            **diagnosis(i),
        }
        for i in order
    ]
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
        "examples": [
            {
                "id": ids[i],
                "epsilon": float(eps[i]),
                "separable": bool(np.isinf(eps[i])),
                "bin": int(c["bins"][i]),
                **diagnosis(i),
            }
            for i in range(len(ids))
        ],
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
    from engine.eval.challenge import example_epsilon, forgetting_quality

    rng = np.random.default_rng(0)
    draws = rng.standard_normal((n, k_u + k_r))
    eps = [example_epsilon(d[:k_u], d[k_u:], delta=delta, two_sided=two_sided) for d in draws]
    return forgetting_quality(np.asarray(eps))


def plot_epsilons(path: Path, result: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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


# audit.md's one-line reading of each separable_reasons() reason (engine/eval/challenge.py has the rule)
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
        if not two_sided
        else ""
    )
    out = [
        "### Level or spread",
        "",
        f"The unlearned models' s varies {fmt(ls['spread_ratio'], '.2f')}x as much over seeds as the retrained "
        "models' (mean per-example standard deviation): K unlearnings of one original inherit its per-example s, "
        "K retrainings differ in everything a seed changes. F with each side's per-example median and spread as "
        f"Gaussians ({ls['draws']} draws of K models, scored against the measured retrained models):",
        "",
        *md_table(
            ["level", "spread", "F", "what it says"],
            [
                [
                    "unlearned",
                    "unlearned",
                    fmt(ls["f_unlearned"], ".3f"),
                    f"the model of the measured F ({fmt(measured_f, '.3f')})",
                ],
                [
                    "retrained",
                    "unlearned",
                    fmt(ls["f_retrained_level"], ".3f"),
                    "every median right: the cost of the spread alone",
                ],
                [
                    "unlearned",
                    "retrained",
                    fmt(ls["f_retrained_spread"], ".3f"),
                    "if the unlearned models varied as retraining does",
                ],
                ["retrained", "retrained", fmt(ls["f_retrained"], ".3f"), "indistinguishable, in this model"],
            ],
        ),  # fmt: skip
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
    u, rt, s = r["utility"]["unlearned"], r["utility"]["retrained"], r["seconds"]
    d = r["distinguishable"]
    out = [
        f"# Audit: {r['method']['name']} on {r['forget']['description']}",
        "",
        f"K = {r['k']} unlearnings of `{r['model_path']}` and K retrained references (seeds {r['seeds'][0]}.."
        f"{r['seeds'][-1]}), scored per forget example ({r['forget']['size']} examples, ids sha256 "
        f"`{r['forget']['ids_sha256'][:16]}`) as the NeurIPS 2023 Machine Unlearning Challenge does.",
        "",
        "## Score",
        "",
        *md_table(
            ["score", "forgetting quality F", "retain accuracy ratio", "test accuracy ratio"],
            [
                [
                    fmt(r["score"], ".4f"),
                    fmt(r["forgetting_quality"], ".4f"),
                    fmt(r["retain_ratio"], ".3f"),
                    fmt(r["test_ratio"], ".3f"),
                ]
            ],
        ),  # fmt: skip
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
        *md_table(
            ["side", "forget acc", "retain acc", "test acc"],
            [
                [name, fmt(100 * x["forget_acc"]), fmt(100 * x["retain_acc"]), fmt(100 * x["test_acc"])]
                for name, x in (("unlearned", u), ("retrained", rt))
            ],
        ),  # fmt: skip
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
            ["reason", "examples", "meaning"],
            [[name, n, REASON_MEANINGS[name]] for name, n in d["by_reason"].items()],
        ),  # fmt: skip
        "",
        *render_level_or_spread(r["level_or_spread"], r["forgetting_quality"], r["two_sided"]),
        f"### The {len(r['worst'])} worst examples",
        "",
        *md_table(
            [
                "id",
                "epsilon",
                "reason",
                "median s unlearned",
                "median s retrained",
                "mean s unlearned",
                "mean s retrained",
                "LiRA (mean log-ratio, unlearned)",
            ],
            [
                [
                    w["id"],
                    "inf" if w["separable"] else fmt(w["epsilon"]),  # fmt() dashes infinities
                    w["reason"] or "-",
                    fmt(w["u_margin_median"]),
                    fmt(w["r_margin_median"]),
                    fmt(w["s_unlearned_mean"]),
                    fmt(w["s_retrained_mean"]),
                    fmt(w["lira_unlearned_mean"]),
                ]
                for w in r["worst"]
            ],
        ),  # fmt: skip
        "",
    ]
    if r["lira"]:
        lira = r["lira"]
        out += [
            "## LiRA",
            "",
            "Per forget example, Gaussians fitted to s of K models trained WITH it (on D) and K without (the "
            "retrained references); each model's log-likelihood ratio (> 0: looks trained on the example). "
            "Retrained models are scored leave-one-out. AUC = chance that an unlearned model's ratio exceeds a "
            "retrained one's: 0.5 = indistinguishable from retraining.",
            "",
            *md_table(
                ["AUC unlearned vs retrained", "called member: unlearned", "called member: retrained"],
                [
                    [
                        fmt(lira.get("auc"), ".3f"),
                        fmt(100 * lira["member_rate_unlearned"], ".1f") + "%",
                        fmt(100 * lira["member_rate_retrained"], ".1f") + "%",
                    ]
                ],
            ),  # fmt: skip
            "",
        ]
    out += [
        "## Run times",
        "",
        *md_table(
            ["models", "mean seconds", "min", "max"],
            [
                [name, fmt(np.mean(v), ".1f"), fmt(min(v), ".1f"), fmt(max(v), ".1f")]
                for name, v in s["per_model"].items()
            ],
        ),  # fmt: skip
        "",
        f"Unlearning takes {fmt(s['unlearn_vs_retrain'], '.3f')} of retraining's time (training loops only). "
        f"Ray tasks: {fmt(s['tasks_wall'], '.1f')} s wall; whole audit {fmt(s['total'], '.1f')} s. References: "
        f"{r['cache']['reused']} reused, {r['cache']['trained']} trained, in `{r['cache']['dir']}`.",
        "",
    ]
    return "\n".join(out)
