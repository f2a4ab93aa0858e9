"""How does SCRUB compare with the other unlearning methods on the same model and data?

One CPU-sized setting of real CIFAR-10 (5 classes, a narrow pre-activation ResNet-18, configs/demo.yaml): the
Original is trained once (`unlearn train --only original`), then every method unlearns it through the same
command, `unlearn run ... method=NAME`: Retrain (from scratch on D_r, the gold standard), Finetune, NegGrad+,
CF-k, EU-k, Bad-Teacher, Fisher forgetting, SCRUB and SCRUB+R (the same run, rewound). Each row reports
forget, retain and test error, the basic membership attack, the time of the unlearning loop, and avg_gap: the
mean absolute distance to Retrain over forget / retain / test error and MIA (lower is closer to exact
unlearning).

Scenarios (``--scenario``): ``class`` forgets every training example of one class (test error on the other
classes); ``random`` forgets a random 10% of the training set (``--fraction``), the selective case where
Retrain's forget error is that of unseen data.

    python -m benchmarks.vision_compare --out runs/compare_class  # 300 images/class
    python -m benchmarks.vision_compare --out runs/compare_random --scenario random
    python -m benchmarks.vision_compare --out /tmp/cmp --quick    # same protocol, < 10 min
    python -m benchmarks.vision_compare --out DIR --methods scrub,finetune --set method.epochs=2

Writes ``DIR/results.json`` ({"rows": [{"method", "forget_error", "retain_error", "test_error", "mia",
"avg_gap", "seconds", "seconds_vs_retrain"}], ...}), ``DIR/results.md`` (header, table, plots, settings) and
``DIR/errors.png``, ``DIR/gap_vs_time.png``; each method's own run (report, plots, model) is under
``DIR/runs/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import kit
from benchmarks.kit import fmt, ov

GAP_KEYS = ROW_KEYS = ("forget_error", "retain_error", "test_error", "mia")
# Every method at the settings of benchmarks/methods.yaml (shared with audit_methods.py); Retrain gets the
# Original's recipe; SCRUB runs rewinding (method.rewind=true), so its one run also gives the SCRUB+R row.
METHODS = ["retrain", *(m for m in kit.METHODS if m != "scrub+r")]
LABELS = {"retrain": "Retrain", "finetune": "Finetune", "neggrad_plus": "NegGrad+", "cf_k": "CF-k",
          "eu_k": "EU-k", "bad_teacher": "Bad-Teacher", "fisher": "Fisher", "scrub": "SCRUB",
          "scrub+r": "SCRUB+R"}  # fmt: skip
COLUMNS = [("method", lambda r: LABELS[r["method"]]), ("forget err %", "forget_error", ".2f"),
           ("retain err %", "retain_error", ".2f"), ("test err %", "test_error", ".2f"),
           ("MIA %", "mia", ".2f"), ("avg gap", "avg_gap", ".2f"), ("seconds", "seconds", ".1f"),
           ("x Retrain", "seconds_vs_retrain", ".3f")]  # fmt: skip
NOTE = ("Errors and MIA in percent (MIA: the SCRUB paper's basic attack, forget vs unseen test examples of "
        "the same classes; Retrain's value is the target). avg gap: mean |value - Retrain's| over forget, "
        "retain and test error and MIA. seconds: the engine's `train_seconds` (the unlearning loop, plus a "
        "method's one-off preparation such as Fisher's; no per-epoch evaluation, no data loading or export). "
        "SCRUB+R is the SCRUB run rewound to a saved epoch: same time.")  # fmt: skip


def parse_args(argv: list[str] | None = None):
    p = kit.parser(__doc__, "same protocol, smaller: under 10 min on 2 cores", vision=True)
    p.add_argument("--scenario", choices=("class", "random"), default="class", help="what to forget")
    p.add_argument("--fraction", type=float, default=0.1, help="random: fraction of the train set to forget")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    args = p.parse_args(argv)
    if not 0 < args.fraction < 1:
        p.error("--fraction must be in (0, 1)")
    methods = kit.choose(p, args.methods, METHODS, "methods")
    args.methods = ["retrain"] + [
        m for m in methods if m != "retrain"
    ]  # every gap and time ratio is to Retrain
    return args


def retrain_overrides(train) -> list[str]:
    """Retrain = the Original's recipe on D_r, from a fresh initialisation."""
    keys = ("optimizer", "lr", "momentum", "weight_decay", "epochs", "lr_decay_epochs", "batch_size",
            "augment")  # fmt: skip
    return ["method=retrain", *(ov(f"method.{k}", getattr(train, k)) for k in keys)]


def done(cfg, folder: Path, report_dir: Path) -> bool:
    """A finished run of exactly this config is in ``folder`` (config.yaml equal, report.json written): reuse
    it, so a rerun after a failure or a change to one method redoes only what changed."""
    import yaml

    saved = folder / "config.yaml"
    if not (saved.is_file() and (report_dir / "report.json").is_file()):
        return False
    return yaml.safe_load(saved.read_text()) == cfg.model_dump(mode="json")


def row(method: str, metrics: dict, seconds) -> dict:
    rounded = {k: kit.rounded(metrics.get(k)) for k in ROW_KEYS}
    return {"method": method, **rounded, "seconds": kit.rounded(seconds, 3)}


def add_gaps(rows: list[dict]) -> None:
    """avg_gap = mean |x - Retrain's x| over GAP_KEYS; seconds_vs_retrain = seconds / Retrain's."""
    ref = next(r for r in rows if r["method"] == "retrain")
    for r in rows:
        gaps = [abs(r[k] - ref[k]) for k in GAP_KEYS if r[k] is not None and ref[k] is not None]
        r["avg_gap"] = round(sum(gaps) / len(gaps), 4) if len(gaps) == len(GAP_KEYS) else None
        r["seconds_vs_retrain"] = (
            round(r["seconds"] / ref["seconds"], 4) if r["seconds"] is not None and ref["seconds"] else None
        )


def plot(rows: list[dict], out: Path, title: str) -> None:
    """errors.png: grouped bars per method; gap_vs_time.png: avg_gap against the time ratio."""
    kit.error_bars(rows, ROW_KEYS, LABELS, out / "errors.png", title, width=10)
    with kit.figure(out / "gap_vs_time.png", (6, 4.5)) as ax:
        for r in rows:
            if r["avg_gap"] is None or r["seconds_vs_retrain"] is None:
                continue
            point = (r["seconds_vs_retrain"], r["avg_gap"])
            ax.scatter(*point, color="tab:red" if r["method"].startswith("scrub") else "k")
            ax.annotate(LABELS[r["method"]], point, fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("time / Retrain's time")
        ax.set_ylabel("avg gap to Retrain (points)")
        ax.set_title("closer to Retrain (down) at less cost (left)", fontsize=10)
        ax.grid(alpha=0.3)


def render(result: dict) -> str:
    st = result["settings"]
    out = ["## Results", "", *kit.table(result["rows"], COLUMNS), "", NOTE, ""]
    if st["scenario"] == "class":
        out += ["Class unlearning: test error is on the other classes.", ""]
    out += [f"Closest to Retrain: {result['closest']}.", ""]
    if result.get("reused"):
        out += [f"Reused from an earlier invocation with the same config: {', '.join(result['reused'])}.", ""]
    out += ["## Plots", "", "![errors per method](errors.png)", "", "![gap vs time](gap_vs_time.png)", ""]
    forget = st["forget"]
    methods = [[LABELS[m], f"`{json.dumps(s)}`"] for m, s in st["methods"].items()]
    out += ["## Settings", "",
            f"- Scenario: {st['scenario']}; forget set: {forget.get('description')} "
            f"({forget.get('size')} examples)",
            f"- Data: `{st['dataset']}`; up to {st['max_per_class']} train rows per class (20% held out as "
            f"validation), {st['max_test_per_class']} test rows per class",
            f"- Model: {st['arch']} x{st['width']}, Original trained with {json.dumps(st['train'])}",
            f"- Size preset: {kit.preset(st['quick'])}; extra overrides: {st['extra_overrides'] or 'none'}",
            "", *kit.md_table(["method", "settings"], methods), ""]  # fmt: skip
    return kit.document(result["title"], result["header"], out, result["wall_seconds"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = kit.Run(args, argv)
    log, out = run.log, run.out

    from engine.config import load_config
    from engine.recipes.train import run_training
    from engine.recipes.unlearn import run_unlearning

    models = out / "models"
    base = kit.vision_overrides(args) + kit.forget_overrides(args.scenario, args.fraction)
    base += [ov("model.path", str(models / "original"))]
    train_cfg = load_config(
        args.config, base + [ov("output_dir", str(models)), "eval.every_epoch=false"] + args.set
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
        folder = out / "runs" / method
        extra = (
            retrain_overrides(train_cfg.train)
            if method == "retrain"
            else kit.method_overrides("scrub+r" if method == "scrub" else method)
        )  # SCRUB rewinds: its run also gives SCRUB+R's row
        cfg = load_config(args.config, base + [ov("output_dir", str(folder))] + extra
                          + ["eval.reference=null", ov("eval.every_epoch", method == "scrub")]
                          + args.set)  # fmt: skip
        settings[method] = cfg.method.model_dump(mode="json")
        if done(cfg, folder, folder) and "original" in reused:
            reused.append(method)
            log(f"{LABELS[method]}: reusing {folder} (same config, same Original)")
        else:
            log(f"{LABELS[method]} -> {folder}")
            run_unlearning(cfg, log=lambda m, method=method: log(f"{method} | {m}"))
        report = kit.read_json(folder / "report.json")
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

    forget = kit.read_json(out / "runs" / args.methods[0] / "report.json")["forget"]
    dataset_name = Path(train_cfg.data.dataset).name or train_cfg.data.dataset
    title = (
        f"Unlearning methods compared: {args.scenario} unlearning on {dataset_name} "
        f"({train_cfg.model.arch} x{train_cfg.model.width})" + (" [--quick]" if args.quick else "")
    )
    keep = ("epoch", "target_error", "forget_errors")
    result = {"rows": rows, "title": title, "header": run.header, "closest": closest,
              "rewound": None if rewound is None else {k: rewound.get(k) for k in keep},
              "settings": kit.vision_settings(args, train_cfg, forget, methods=settings), "reused": reused,
              "wall_seconds": run.seconds()}  # fmt: skip
    plot(rows, out, title)
    table = kit.table(rows, COLUMNS)
    return run.finish(result, render(result), title, *table, f"\nclosest to Retrain: {closest}")


if __name__ == "__main__":
    kit.main(main)
