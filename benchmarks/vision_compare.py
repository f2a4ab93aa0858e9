"""How does SCRUB compare with the other unlearning methods on the same model and data?

One CPU-sized setting of real CIFAR-10 (5 classes, a narrow pre-activation ResNet-18, configs/demo.yaml): the
Original is trained once (`unlearn train --only original`), then every method unlearns it through the same
command, `unlearn run ... method=NAME`: Retrain (from scratch on D_r, the gold standard), Finetune, NegGrad+,
CF-k, EU-k, Bad-Teacher, Fisher forgetting, SCRUB and SCRUB+R (the same run, rewound). Each row reports forget,
retain and test error, the basic membership attack, the time of the unlearning loop, and avg_gap: the mean
absolute distance to Retrain over forget / retain / test error and MIA (lower is closer to exact unlearning).

Scenarios (``--scenario``): ``class`` forgets every training example of one class (test error on the other
classes); ``random`` forgets a random 10% of the training set (``--fraction``), the selective case where
Retrain's forget error is that of unseen data.

    python benchmarks/vision_compare.py --out runs/compare_class                    # 300 images/class
    python benchmarks/vision_compare.py --out runs/compare_random --scenario random
    python benchmarks/vision_compare.py --out /tmp/cmp --quick                       # same protocol, < 10 min
    python benchmarks/vision_compare.py --out DIR --methods scrub,finetune --set method.epochs=2

Writes ``DIR/results.json`` ({"rows": [{"method", "forget_error", "retain_error", "test_error", "mia",
"avg_gap", "seconds", "seconds_vs_retrain"}], ...}), ``DIR/results.md`` (header, table, plots, settings) and
``DIR/errors.png``, ``DIR/gap_vs_time.png``; each method's own run (report, plots, model) is under ``DIR/runs/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.vision_compare
    from _common import (
        REPO,
        fmt,
        header_markdown,
        md_table,
        num,
        quiet_log,
        run_header,
        write_json,
        write_text,
    )
except ImportError:  # pragma: no cover
    from benchmarks._common import (
        REPO,
        fmt,
        header_markdown,
        md_table,
        num,
        quiet_log,
        run_header,
        write_json,
        write_text,
    )

DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"
GAP_KEYS = ("forget_error", "retain_error", "test_error", "mia")
ROW_KEYS = ("forget_error", "retain_error", "test_error", "mia")

# Every method at settings sized for this data (a few hundred images per class, batches scaled down as
# configs/demo.yaml does for SCRUB); the optimizer defaults are each method's own (engine/methods/).
# "scrub+r" is not a run: it is the SCRUB run's rewound model (method.rewind=true).
METHODS: dict[str, list[str]] = {
    "retrain": [],  # filled from the train recipe: same epochs, lr, batch and augmentation as the Original
    "finetune": ["method.epochs=10", "method.lr=0.01", "method.batch_size=32"],
    "neggrad_plus": ["method.epochs=5", "method.lr=0.01", "method.batch_size=32", "method.beta=0.95"],
    "cf_k": ["method.epochs=10", "method.lr=0.01", "method.batch_size=32"],
    "eu_k": ["method.epochs=10", "method.batch_size=32"],
    "bad_teacher": ["method.epochs=1", "method.batch_size=32"],
    "fisher": [],
    # configs/demo.yaml's SCRUB (the paper's large-scale row, lr 5e-4) with batches 16/32: at 80-240 forget images,
    # batches of 64 give too few max-steps (docs/algorithm.md, "How SCRUB fares, measured")
    "scrub": [
        "method.rewind=true",
        "method.forget_batch_size=16",
        "method.retain_batch_size=32",
    ],
}
LABELS = {
    "retrain": "Retrain",
    "finetune": "Finetune",
    "neggrad_plus": "NegGrad+",
    "cf_k": "CF-k",
    "eu_k": "EU-k",
    "bad_teacher": "Bad-Teacher",
    "fisher": "Fisher",
    "scrub": "SCRUB",
    "scrub+r": "SCRUB+R",
}
# --quick: the same protocol on 100 images per class (80 train + 20 validation) and 100 test per class.
QUICK = {"data.max_per_class": 100, "data.max_test_per_class": 100}


def _ov(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, runs/)")
    p.add_argument("--scenario", choices=("class", "random"), default="class", help="what to forget")
    p.add_argument("--fraction", type=float, default=0.1, help="random: fraction of the train set to forget")
    p.add_argument("--dataset", default=None, help=f"local folder/file or hub id (default: {DEFAULT_DATA})")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: the config's)")
    p.add_argument("--quick", action="store_true", help="same protocol, smaller: under 10 min on 2 cores")
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="base config (default: configs/demo.yaml)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override applied last to every run (repeatable)",
    )
    args = p.parse_args(argv)
    if not 0 < args.fraction < 1:
        p.error("--fraction must be in (0, 1)")
    methods = (
        list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    )
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if "retrain" not in methods:
        methods.insert(0, "retrain")  # every gap and time ratio is measured against it
    args.methods = methods
    return args


def base_overrides(args: argparse.Namespace) -> list[str]:
    spec = args.dataset
    dataset = (
        str(DEFAULT_DATA) if spec is None else (str(Path(spec).resolve()) if Path(spec).exists() else spec)
    )
    ov = [_ov("data.dataset", dataset), "logging.progress=false", "overwrite=true", "backend.num_threads=1"]
    if args.seed is not None:
        ov.append(_ov("seed", args.seed))
    if args.scenario == "class":
        ov += ["forget.kind=class"]
    else:
        ov += ["forget.kind=random", _ov("forget.fraction", args.fraction), "forget.label=null"]
    if args.quick:
        ov += [_ov(k, v) for k, v in QUICK.items()]
    return ov


def retrain_overrides(train) -> list[str]:
    """Retrain = the Original's recipe on D_r, from a fresh initialisation."""
    keys = (
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "epochs",
        "lr_decay_epochs",
        "batch_size",
        "augment",
    )
    return [_ov(f"method.{k}", getattr(train, k)) for k in keys]


def done(cfg, folder: Path, report_dir: Path) -> bool:
    """A finished run of exactly this config is in ``folder`` (config.yaml equal, report.json written): reuse
    it, so a rerun after a failure or a change to one method redoes only what changed."""
    import yaml

    saved = folder / "config.yaml"
    return (
        saved.is_file()
        and (report_dir / "report.json").is_file()
        and yaml.safe_load(saved.read_text()) == cfg.model_dump(mode="json")
    )


def row(method: str, metrics: dict, seconds) -> dict:
    return {"method": method, **{k: _r(metrics.get(k)) for k in ROW_KEYS}, "seconds": _r(seconds, 3)}


def _r(value, digits: int = 4):
    x = num(value)
    return None if x is None else round(x, digits)


def add_gaps(rows: list[dict]) -> None:
    """avg_gap = mean |x - Retrain's x| over GAP_KEYS; seconds_vs_retrain = seconds / Retrain's."""
    ref = next(r for r in rows if r["method"] == "retrain")
    for r in rows:
        gaps = [abs(r[k] - ref[k]) for k in GAP_KEYS if r[k] is not None and ref[k] is not None]
        r["avg_gap"] = round(sum(gaps) / len(gaps), 4) if len(gaps) == len(GAP_KEYS) else None
        r["seconds_vs_retrain"] = (
            round(r["seconds"] / ref["seconds"], 4) if r["seconds"] is not None and ref["seconds"] else None
        )


def results_table(rows: list[dict]) -> list[str]:
    header = [
        "method",
        "forget err %",
        "retain err %",
        "test err %",
        "MIA %",
        "avg gap",
        "seconds",
        "x Retrain",
    ]
    body = [
        [LABELS[r["method"]]]
        + [fmt(r[k]) for k in ROW_KEYS]
        + [fmt(r["avg_gap"]), fmt(r["seconds"], ".1f"), fmt(r["seconds_vs_retrain"], ".3f")]
        for r in rows
    ]
    return md_table(header, body)


def plot(rows: list[dict], out: Path, title: str) -> None:
    """errors.png: grouped bars per method; gap_vs_time.png: avg_gap against the time ratio."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = {
        "forget_error": "tab:red",
        "retain_error": "tab:blue",
        "test_error": "tab:green",
        "mia": "tab:gray",
    }
    fig = Figure(figsize=(10, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, width = np.arange(len(rows)), 0.2
    for i, key in enumerate(ROW_KEYS):
        ys = [np.nan if r[key] is None else r[key] for r in rows]
        ax.bar(xs + (i - 1.5) * width, ys, width, color=colours[key], label=key.replace("_", " "))
    ax.set_xticks(xs, [LABELS[r["method"]] for r in rows])
    ax.set_ylabel("%")
    ax.set_ylim(0, 118)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=4)
    fig.tight_layout()
    fig.savefig(out / "errors.png", format="png", dpi=120)

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        if r["avg_gap"] is None or r["seconds_vs_retrain"] is None:
            continue
        ax.scatter(
            r["seconds_vs_retrain"], r["avg_gap"], color="tab:red" if r["method"].startswith("scrub") else "k"
        )
        ax.annotate(LABELS[r["method"]], (r["seconds_vs_retrain"], r["avg_gap"]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("time / Retrain's time")
    ax.set_ylabel("avg gap to Retrain (points)")
    ax.set_title("closer to Retrain (down) at less cost (left)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "gap_vs_time.png", format="png", dpi=120)


def render(result: dict) -> str:
    st = result["settings"]
    out = [
        f"# {result['title']}",
        "",
        *header_markdown(result["header"]),
        f"- Wall time: {result['wall_seconds']:.1f} s",
        "",
    ]
    out += ["## Results", "", *results_table(result["rows"]), ""]
    out += [
        "Errors and MIA in percent (MIA: the SCRUB paper's basic attack, forget vs unseen test examples of the "
        "same classes; Retrain's value is the target). avg gap: mean |value - Retrain's| over forget, retain and "
        "test error and MIA. seconds: the engine's `train_seconds` (the unlearning loop, plus a method's one-off "
        "preparation such as Fisher's; no per-epoch evaluation, no data loading or export). SCRUB+R is the SCRUB "
        "run rewound to a saved epoch: same time.",
        "",
    ]
    if st["scenario"] == "class":
        out += ["Class unlearning: test error is on the other classes.", ""]
    out += [f"Closest to Retrain: {result['closest']}.", ""]
    if result.get("reused"):
        out += [f"Reused from an earlier invocation with the same config: {', '.join(result['reused'])}.", ""]
    out += ["## Plots", "", "![errors per method](errors.png)", "", "![gap vs time](gap_vs_time.png)", ""]
    out += ["## Settings", ""]
    out += [
        f"- Scenario: {st['scenario']}; forget set: {st['forget'].get('description')} ({st['forget'].get('size')} "
        "examples)",
        f"- Data: `{st['dataset']}`; up to {st['max_per_class']} train rows per class (20% held out as validation), "
        f"{st['max_test_per_class']} test rows per class",
        f"- Model: {st['arch']} x{st['width']}, Original trained with {json.dumps(st['train'])}",
        f"- Size preset: {'--quick ' + json.dumps(QUICK) if st['quick'] else 'full (configs/demo.yaml sizes)'}; "
        f"extra overrides: {st['extra_overrides'] or 'none'}",
        "",
        *md_table(
            ["method", "settings"], [[LABELS[m], f"`{json.dumps(s)}`"] for m, s in st["methods"].items()]
        ),
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    header = run_header(sys.argv[1:] if argv is None else argv)

    from engine.config import load_config
    from engine.recipes.train import run_training
    from engine.recipes.unlearn import run_unlearning

    log = quiet_log(t_start)

    out = args.out.expanduser().resolve()
    models = out / "models"
    base = base_overrides(args)
    common = [_ov("model.path", str(models / "original"))]
    train_cfg = load_config(
        args.config,
        base + common + [_ov("output_dir", str(models)), "eval.every_epoch=false"] + args.overrides,
    )
    reused = []
    if done(train_cfg, models, models / "original"):
        reused.append("original")
        log(f"reusing the Original in {models / 'original'} (same config)")
    else:
        log(f"training the Original -> {models / 'original'}")
        run_training(train_cfg, targets=("original",), log=lambda m: log(f"original | {m}"))

    rows, settings, rewound = [], {}, None
    for method in args.methods:
        extra = retrain_overrides(train_cfg.train) if method == "retrain" else METHODS[method]
        cfg = load_config(
            args.config,
            base
            + common
            + [_ov("output_dir", str(out / "runs" / method)), f"method={method}", *extra]
            + ["eval.reference=null", _ov("eval.every_epoch", method == "scrub")]
            + args.overrides,
        )
        settings[method] = cfg.method.model_dump(mode="json")
        if done(cfg, out / "runs" / method, out / "runs" / method) and "original" in reused:
            reused.append(method)
            log(f"{LABELS[method]}: reusing {out / 'runs' / method} (same config, same Original)")
        else:
            log(f"{LABELS[method]} -> {out / 'runs' / method}")
            run_unlearning(cfg, log=lambda m, method=method: log(f"{method} | {m}"))
        report = json.loads((out / "runs" / method / "report.json").read_text())
        rows.append(row(method, report["metrics"], report["train_seconds"]))
        if method == "scrub" and report.get("rewound"):
            rewound = report["rewound"]
            rows.append(row("scrub+r", rewound["metrics"], report["train_seconds"]))
        log(f"{LABELS[method]}: " + "  ".join(f"{k}={fmt(rows[-1][k])}" for k in ROW_KEYS))
    add_gaps(rows)
    ranked = sorted(
        (r for r in rows if r["method"] != "retrain" and r["avg_gap"] is not None), key=lambda r: r["avg_gap"]
    )
    closest = ", ".join(f"{LABELS[r['method']]} ({fmt(r['avg_gap'])})" for r in ranked[:3])

    forget = json.loads((out / "runs" / args.methods[0] / "report.json").read_text())["forget"]
    dataset_name = Path(train_cfg.data.dataset).name or train_cfg.data.dataset
    title = (
        f"Unlearning methods compared: {args.scenario} unlearning on {dataset_name} "
        f"({train_cfg.model.arch} x{train_cfg.model.width})" + (" [--quick]" if args.quick else "")
    )
    result = {
        "rows": rows,
        "title": title,
        "header": header,
        "closest": closest,
        "rewound": None
        if rewound is None
        else {k: rewound.get(k) for k in ("epoch", "target_error", "forget_errors")},
        "settings": {
            "scenario": args.scenario,
            "quick": args.quick,
            "dataset": train_cfg.data.dataset,
            "max_per_class": train_cfg.data.max_per_class,
            "max_test_per_class": train_cfg.data.max_test_per_class,
            "forget": forget,
            "arch": train_cfg.model.arch,
            "width": train_cfg.model.width,
            "train": train_cfg.train.model_dump(mode="json"),
            "methods": settings,
            "extra_overrides": args.overrides,
        },
        "reused": reused,
        "wall_seconds": time.perf_counter() - t_start,
    }
    plot(rows, out, title)
    write_json(out / "results.json", result)
    write_text(out / "results.md", render(result))
    print()
    print(title)
    print("\n".join(results_table(rows)))
    print(
        f"\nclosest to Retrain: {closest}\nwall time {result['wall_seconds']:.1f} s; results in {out / 'results.md'}"
    )
    return result


if __name__ == "__main__":
    from engine.errors import EngineError

    try:
        main()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
