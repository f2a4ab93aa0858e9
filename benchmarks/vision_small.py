"""Does the engine's SCRUB reach Retrain on real images, at a fraction of Retrain's cost?

The small-scale protocol of the SCRUB paper, CPU-sized: a 5-class subset of real CIFAR-10 (a few hundred
images per class), a narrow pre-activation ResNet-18. It trains Original (on D = D_r + D_f) and Retrain (on
D_r alone, the exact-unlearning gold standard) from scratch with one recipe (``run_training``), unlearns the
Original with SCRUB (``run_unlearning`` with ``method.rewind=true``: one run gives the SCRUB and the SCRUB+R
row), from ``configs/demo.yaml`` plus overrides, and reports forget / retain / test / validation error, the
basic membership-inference attack, MIA-efficacy and the time each took (the engine's ``train_seconds``).

Scenarios (``--scenario``): ``class`` forgets every training example of one class (the test error is then on
the other classes); ``selective`` forgets N random training examples of one class (default: 25% of them).
The checks (PASS / MISS): SCRUB's forget error within 5 points of Retrain's, its test error within 2 points of
Original's, its time at most 0.25 of Retrain's. benchmarks/README.md gives the figures and their reading.

    python -m benchmarks.vision_small --out runs/vision_small  # 300 images/class, 16 epochs
    python -m benchmarks.vision_small --out runs/vs_sel --scenario selective
    python -m benchmarks.vision_small --out /tmp/vs_quick --quick  # same protocol, < 5 min
    python -m benchmarks.vision_small --out DIR --set method.epochs=2 --set train.epochs=20  # any config key

Writes ``DIR/results.json`` ({"rows": [...], ...}), ``DIR/results.md`` (header, table, checks, settings,
plots), ``DIR/errors.png``; the runs themselves are under ``DIR/models/original``, ``DIR/models/retrain`` and
``DIR/scrub``.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import kit
from benchmarks.kit import fmt, md_table, num, ov

METHODS = ("original", "retrain", "scrub", "scrub+r")
LABELS = {"original": "Original", "retrain": "Retrain", "scrub": "SCRUB", "scrub+r": "SCRUB+R"}
ERROR_KEYS = ("forget_error", "retain_error", "test_error")
ROW_KEYS = ("forget_error", "retain_error", "test_error", "val_error", "mia", "mia_efficacy")
COLUMNS = [("method", "method"), ("forget err %", "forget_error", ".2f"),
           ("retain err %", "retain_error", ".2f"), ("test err %", "test_error", ".2f"),
           ("val err %", "val_error", ".2f"), ("MIA %", "mia", ".2f"),
           ("MIA-efficacy %", "mia_efficacy", ".2f"), ("seconds", "seconds", ".1f"),
           ("x Retrain time", "seconds_vs_retrain", ".3f")]  # fmt: skip
# --quick (kit.VISION_QUICK) keeps the training epochs and SCRUB's schedule, so SCRUB's time relative to
# Retrain's stays comparable with the full run's; it skips the per-epoch evaluation while training Original /
# Retrain (not part of the reported times, only of the wall time).
FORGET_TOL, TEST_TOL, TIME_RATIO = 5.0, 2.0, 0.25  # the checks the issue expects


def parse_args(argv: list[str] | None = None):
    p = kit.parser(__doc__, "same protocol, smaller: finishes in < 5 min on 2 cores", vision=True)
    p.add_argument("--scenario", choices=("class", "selective"), default="class", help="what to forget")
    p.add_argument("--label", default=None, help="class to forget, index or name (default: the config's)")
    p.add_argument(
        "--count", type=int, help="selective: examples to forget (default: --fraction of the class)"
    )
    p.add_argument("--fraction", type=float, default=0.25,
                   help="selective: fraction of the class's training examples to forget when --count is not "
                   "given")  # fmt: skip
    args = p.parse_args(argv)  # --set: applied last to both runs; eval.every_epoch only affects training
    if args.count is not None and args.scenario != "selective":
        p.error("--count only applies to --scenario selective")
    if not 0 < args.fraction <= 1:
        p.error("--fraction must be in (0, 1]")
    return args


def base_overrides(args) -> list[str]:
    label = int(args.label) if args.label is not None and args.label.lstrip("-").isdigit() else args.label
    return kit.vision_overrides(args, **{"forget.label": label})


def describe_data(args, base: list[str], log) -> tuple[dict, int | None]:
    """Load the data once as the recipes will (fails fast on a bad dataset / label), for the sizes and, under
    selective unlearning, the forget count (``--fraction`` of the class's training examples)."""
    from engine.config import load_config
    from engine.data.vision import prepare_data

    cfg = load_config(args.config, base + ["forget.kind=class", "forget.count=null"] + args.set)
    data = prepare_data(cfg.data, cfg.forget)
    class_train = len(data.forget)
    sizes = {"classes": data.class_names, "forget_class": data.class_names[data.forget_classes[0]],
             "train": len(data.train), "val": len(data.val), "test": len(data.test),
             "class_train_examples": class_train}  # fmt: skip
    count = None
    if args.scenario == "selective":
        count = args.count if args.count is not None else max(1, round(args.fraction * class_train))
        if count > class_train:
            raise SystemExit(
                f"--count {count} but class {sizes['forget_class']!r} has {class_train} training examples"
            )
    log(
        f"data: {len(data.class_names)} classes {data.class_names}; train {sizes['train']}, "
        f"val {sizes['val']}, test {sizes['test']}; class {sizes['forget_class']!r} has {class_train} "
        "training examples"
    )
    return sizes, count


def scenario_overrides(args, count: int | None) -> list[str]:
    if args.scenario == "class":
        return ["forget.kind=class", "forget.count=null"]
    return ["forget.kind=selective", ov("forget.count", count)]


def collect_rows(out: Path) -> tuple[list[dict], dict]:
    """The four rows from the runs' report.json files, and the SCRUB run's report."""
    original, retrain = (kit.read_json(out / "models" / t / "report.json") for t in ("original", "retrain"))
    scrub = kit.read_json(out / "scrub" / "report.json")
    rewound = {**scrub, "metrics": (scrub.get("rewound") or {}).get("metrics") or {}}  # the same run's time
    retrain_seconds, rows = num(retrain.get("train_seconds")), []
    for method, report in zip(METHODS, (original, retrain, scrub, rewound), strict=True):
        seconds = report.get("train_seconds")
        ratio = num(seconds) / retrain_seconds if num(seconds) is not None and retrain_seconds else None
        metrics = {k: kit.rounded(report["metrics"].get(k)) for k in ROW_KEYS}
        rows.append({"method": method, **metrics, "seconds": kit.rounded(seconds, 3),
                     "seconds_vs_retrain": kit.rounded(ratio)})  # fmt: skip
    return rows, scrub


def evaluate_checks(rows: list[dict]) -> list[dict]:
    by = {r["method"]: r for r in rows}
    s, rt, o = by["scrub"], by["retrain"], by["original"]

    def diff(a, b):
        return None if a is None or b is None else a - b

    forget, test = diff(s["forget_error"], rt["forget_error"]), diff(s["test_error"], o["test_error"])
    ratio = s["seconds_vs_retrain"]
    note = " (lower than Original's)" if test is not None and test < -TEST_TOL else ""
    return [
        {"check": f"SCRUB's forget error within {FORGET_TOL:g} points of Retrain's",
         "passed": None if forget is None else abs(forget) <= FORGET_TOL,
         "detail": f"SCRUB {fmt(s['forget_error'])}% vs Retrain {fmt(rt['forget_error'])}% "
         f"(difference {fmt(forget, '+.2f')} points)"},
        {"check": f"SCRUB's test error within {TEST_TOL:g} points of Original's",
         "passed": None if test is None else abs(test) <= TEST_TOL,
         "detail": f"SCRUB {fmt(s['test_error'])}% vs Original {fmt(o['test_error'])}% "
         f"(difference {fmt(test, '+.2f')} points){note}"},
        {"check": f"SCRUB's time at most {TIME_RATIO:g} of Retrain's",
         "passed": None if ratio is None else ratio <= TIME_RATIO,
         "detail": f"SCRUB {fmt(s['seconds'], '.1f')} s vs Retrain {fmt(rt['seconds'], '.1f')} s "
         f"(ratio {fmt(ratio, '.3f')})"},
    ]  # fmt: skip


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("PASS" if passed else "MISS")


def render_markdown(result: dict) -> str:
    st, rows, checks, rw = result["settings"], result["rows"], result["checks"], result["rewound"]
    sizes, train, forget = st["data"], st["train"], st["forget"]
    out = ["## Results", "", *kit.table(rows, COLUMNS), ""]
    out += [
        "Errors and attacks in percent. `seconds` = the engine's `train_seconds`: the training / unlearning "
        "loop without its per-epoch evaluation (data loading, final scoring and export not included); "
        "SCRUB+R is the same run as SCRUB, rewound to a saved epoch, so it has the same time.",
        "",
    ]
    if st["scenario"] == "class":
        out += [
            "Class unlearning: test error is on the other classes (the forgotten class's is left out).",
            "",
        ]
    out += [
        f"SCRUB+R rewound to epoch {rw.get('epoch', '–')} (0 = the Original): target = SCRUB's final error "
        f"on the forget-validation set, {fmt(rw.get('target_error'))}%; forget error per epoch from epoch 0: "
        f"{', '.join(fmt(e) for e in rw.get('forget_errors') or []) or '–'}.",
        "",
    ]
    out += ["## Checks", ""]
    out += md_table(
        ["check", "result", "numbers"], [[c["check"], _verdict(c["passed"]), c["detail"]] for c in checks]
    )
    out += ["", "## Plots", "", "![Forget / retain / test error per method](errors.png)", "",
            "SCRUB's run, per epoch (dashed: Retrain):", "",
            "![SCRUB errors per epoch](scrub/plots/errors.png)", "",
            "![SCRUB losses per step](scrub/plots/losses.png)", ""]  # fmt: skip
    out += [
        "## Settings",
        "",
        f"- Scenario: {st['scenario']}; forget set: {forget['description']} ({forget['size']} examples)",
        f"- Data: `{st['dataset']}`, classes {sizes['classes']}; up to {st['max_per_class']} train rows per "
        f"class, {st['val_fraction']:.0%} of them held out as validation; up to {st['max_test_per_class']} "
        f"test rows per class -> train {sizes['train']} (retain {sizes['train'] - forget['size']}, "
        f"forget {forget['size']}), val {sizes['val']}, test {sizes['test']}",
        f"- Model: {st['arch']} at width {st['width']}, from scratch; seed {st['seed']}; "
        f"{st['num_threads']} torch thread(s)",
        f"- Original / Retrain recipe: {train['optimizer']} lr {train['lr']}, momentum "
        f"{train.get('momentum')}, weight decay {train['weight_decay']}, {train['epochs']} epochs, lr x0.1 "
        f"after epochs {train['lr_decay_epochs']}, batch {train['batch_size']}, augment {train['augment']}; "
        "Retrain = the same recipe and seed on D_r alone (not padded back to |D|); per-epoch evaluation "
        f"while training: {st['train_eval_every_epoch']}",
        f"- Size preset: {kit.preset(st['quick'])}",
        f"- Extra overrides: {st['extra_overrides'] or 'none'}",
        "",
        "SCRUB hyperparameters:",
        "",
        *md_table(["setting", "value"], [[k, json.dumps(v)] for k, v in st["method"].items()]),
        "",
        "## Runs",
        "",
        "- [Original](models/original/report.md), [Retrain](models/retrain/report.md), "
        "[SCRUB / SCRUB+R](scrub/report.md)",
        "",
    ]
    return kit.document(result["title"], result["header"], out, result["wall_seconds"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = kit.Run(args, argv)
    log, out = run.log, run.out

    from engine.config import load_config
    from engine.recipes.train import run_training
    from engine.recipes.unlearn import run_unlearning

    models = out / "models"
    base = base_overrides(args)
    sizes, count = describe_data(args, base, log)
    base += scenario_overrides(args, count) + [ov("model.path", str(models / "original"))]
    # --set applies to both runs; eval.every_epoch from --set only affects training (SCRUB+R needs it).
    train_cfg = load_config(
        args.config, base + [ov("output_dir", str(models)), ov("eval.every_epoch", not args.quick)] + args.set
    )
    scrub = [ov("output_dir", str(out / "scrub")), ov("eval.reference", str(models / "retrain"))]
    rewind = ["method.name=scrub", "method.rewind=true", "eval.every_epoch=true"]
    scrub_cfg = load_config(args.config, base + scrub + args.set + rewind)

    log(f"training Original and Retrain -> {models}")
    run_training(train_cfg, log=lambda m: log(f"train | {m}"))
    log(f"unlearning with SCRUB (+R) -> {out / 'scrub'}")
    run_unlearning(scrub_cfg, log=lambda m: log(f"scrub | {m}"))

    rows, scrub_report = collect_rows(out)
    checks = evaluate_checks(rows)
    dataset_name = Path(train_cfg.data.dataset).name or train_cfg.data.dataset
    title = (
        f"SCRUB, small scale: {args.scenario} unlearning on {dataset_name} "
        f"({len(sizes['classes'])} classes, {train_cfg.model.arch} x{train_cfg.model.width})"
        + (" [--quick]" if args.quick else "")
    )
    settings = kit.vision_settings(args, train_cfg, scrub_report.get("forget") or {}, data=sizes,
                                   val_fraction=train_cfg.data.val_fraction, seed=train_cfg.seed,
                                   num_threads=train_cfg.backend.num_threads,
                                   train_eval_every_epoch=train_cfg.eval.every_epoch,
                                   method=scrub_cfg.method.model_dump(mode="json"),
                                   config=str(args.config))  # fmt: skip
    rewound = scrub_report.get("rewound") or {}
    result = {"rows": rows, "title": title, "header": run.header, "settings": settings, "checks": checks,
              "rewound": {k: rewound.get(k) for k in ("epoch", "target_error", "forget_errors")},
              "wall_seconds": run.seconds()}  # fmt: skip
    kit.error_bars(rows, ERROR_KEYS, LABELS, out / "errors.png", title, width=7.5, numbers=True)
    verdicts = [f"{_verdict(c['passed'])}  {c['check']}: {c['detail']}" for c in checks]
    return run.finish(result, render_markdown(result), title, *kit.table(rows, COLUMNS), "", *verdicts)


if __name__ == "__main__":
    kit.main(main)
