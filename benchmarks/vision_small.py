"""Does the engine's SCRUB reach Retrain on real images, at a fraction of Retrain's cost?

The small-scale protocol of the SCRUB paper, CPU-sized: a 5-class subset of real CIFAR-10 (a few hundred
images per class), a narrow pre-activation ResNet-18. It trains Original (on D = D_r + D_f) and Retrain (on D_r
alone, the exact-unlearning gold standard) from scratch with one recipe, unlearns the Original with SCRUB, and
reports SCRUB and SCRUB+R (rewinding) next to both: forget / retain / test / validation error, the basic
membership-inference attack, MIA-efficacy and the time each took.

It drives the engine's own recipes (``engine.recipes.train.run_training`` once for Original + Retrain, then
``engine.recipes.unlearn.run_unlearning`` with ``method.rewind=true``, whose one run gives both the SCRUB and the
SCRUB+R row), starting from ``configs/demo.yaml`` plus overrides; nothing here trains or scores a model itself.

Scenarios (``--scenario``):
- ``class``: forget every training example of one class (the test error is then on the other classes);
- ``selective``: forget N random training examples of one class (default: 25% of that class's training
  examples), where Retrain's forget error is that of unseen data and SCRUB has to move it there.

The checks the issue expects are evaluated and printed as PASS / MISS with their numbers: SCRUB's forget error
within 5 points of Retrain's, SCRUB's test error within 2 points of Original's, SCRUB's time at most 0.25 of
Retrain's. Times are the engine's ``train_seconds``: the training / unlearning loop without its per-epoch
evaluation (for SCRUB+R, the same run's time: rewinding only picks a saved epoch).

    python benchmarks/vision_small.py --out runs/vision_small                       # 300 images/class, 16 epochs
    python benchmarks/vision_small.py --out runs/vs_sel --scenario selective
    python benchmarks/vision_small.py --out /tmp/vs_quick --quick                     # same protocol, < 5 min
    python benchmarks/vision_small.py --out DIR --set method.epochs=2 --set train.epochs=20   # any config key

Writes ``DIR/results.json`` ({"rows": [...], ...}), ``DIR/results.md`` (header, table, checks, settings, plots),
``DIR/errors.png``; the runs themselves (checkpoints, per-run reports and plots) are under ``DIR/models/original``,
``DIR/models/retrain`` and ``DIR/scrub``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.vision_small
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
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"  # ../shared/data/cifar10 from the repository root
METHODS = ("original", "retrain", "scrub", "scrub+r")
LABELS = {"original": "Original", "retrain": "Retrain", "scrub": "SCRUB", "scrub+r": "SCRUB+R"}
ERROR_KEYS = ("forget_error", "retain_error", "test_error")
ROW_KEYS = ("forget_error", "retain_error", "test_error", "val_error", "mia", "mia_efficacy")

# --quick: the same protocol on fewer images per class (80 train + 20 validation instead of 240 + 60, 100 test
# instead of 200), with the same training epochs and SCRUB schedule, so SCRUB's time relative to Retrain's stays
# comparable with the full run's; and no per-epoch evaluation while training Original / Retrain (it is not part
# of the reported times, only of the wall time). About 2 min on 2 idle cores (one thread).
QUICK = {
    "data.max_per_class": 100,
    "data.max_test_per_class": 100,
}

# The checks the issue expects: (id, text, passes(rows) -> (bool | None, detail)).
FORGET_TOL, TEST_TOL, TIME_RATIO = 5.0, 2.0, 0.25


def _ov(key: str, value) -> str:
    """One ``key=value`` override; the value as JSON, which the config loader parses as YAML (a superset)."""
    return f"{key}={json.dumps(value)}"


def resolve_dataset(spec: str | None) -> str:
    """A local path (made absolute, so the run does not depend on the working directory) or a hub id as given."""
    if spec is None:
        return str(DEFAULT_DATA)
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, runs)")
    p.add_argument("--scenario", choices=("class", "selective"), default="class", help="what to forget")
    p.add_argument(
        "--dataset",
        default=None,
        help=f"local folder/file or hub id with CIFAR-10's layout (default: {DEFAULT_DATA})",
    )
    p.add_argument("--label", default=None, help="class to forget, index or name (default: the config's)")
    p.add_argument(
        "--count",
        type=int,
        default=None,
        help="selective: examples to forget (default: --fraction of the class)",
    )
    p.add_argument(
        "--fraction",
        type=float,
        default=0.25,
        help="selective: fraction of the class's training examples to forget when --count is not given",
    )
    p.add_argument("--seed", type=int, default=None, help="run seed (default: the config's)")
    p.add_argument(
        "--quick", action="store_true", help="same protocol, smaller: finishes in < 5 min on 2 cores"
    )
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="base config (default: configs/demo.yaml)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override, applied last to both runs (repeatable), e.g. method.epochs=2; "
        "eval.every_epoch only affects training (SCRUB+R needs it)",
    )
    args = p.parse_args(argv)
    if args.count is not None and args.scenario != "selective":
        p.error("--count only applies to --scenario selective")
    if not 0 < args.fraction <= 1:
        p.error("--fraction must be in (0, 1]")
    return args


def base_overrides(args: argparse.Namespace) -> list[str]:
    ov = [_ov("data.dataset", resolve_dataset(args.dataset)), "logging.progress=false", "overwrite=true"]
    ov.append("backend.num_threads=1")
    if args.seed is not None:
        ov.append(_ov("seed", args.seed))
    if args.label is not None:
        ov.append(_ov("forget.label", int(args.label) if args.label.lstrip("-").isdigit() else args.label))
    if args.quick:
        ov += [_ov(k, v) for k, v in QUICK.items()]
    return ov


def describe_data(args: argparse.Namespace, ov: list[str], log) -> tuple[dict, int | None]:
    """Load the data once as the recipes will (fails fast on a bad dataset / label), for the sizes and, under
    selective unlearning, the forget count (``--fraction`` of the class's training examples)."""
    from engine.config import load_config
    from engine.data.vision import prepare_data

    cfg = load_config(args.config, ov + ["forget.kind=class", "forget.count=null"] + args.overrides)
    data = prepare_data(cfg.data, cfg.forget)
    class_train = len(data.forget)
    sizes = {
        "classes": data.class_names,
        "forget_class": data.class_names[data.forget_classes[0]],
        "train": len(data.train),
        "val": len(data.val),
        "test": len(data.test),
        "class_train_examples": class_train,
    }
    count = None
    if args.scenario == "selective":
        count = args.count if args.count is not None else max(1, round(args.fraction * class_train))
        if count > class_train:
            raise SystemExit(
                f"--count {count} but class {sizes['forget_class']!r} has {class_train} training examples"
            )
    log(
        f"data: {len(data.class_names)} classes {data.class_names}; train {sizes['train']}, val {sizes['val']}, "
        f"test {sizes['test']}; class {sizes['forget_class']!r} has {class_train} training examples"
    )
    return sizes, count


def scenario_overrides(args: argparse.Namespace, count: int | None) -> list[str]:
    if args.scenario == "class":
        return ["forget.kind=class", "forget.count=null"]
    return ["forget.kind=selective", _ov("forget.count", count)]


def _read(path: Path) -> dict:
    return json.loads((path / "report.json").read_text())


def _round(value, digits: int) -> float | None:
    x = num(value)
    return None if x is None else round(x, digits)


def collect_rows(out: Path) -> tuple[list[dict], dict]:
    """The four rows from the runs' report.json files, and the SCRUB run's report."""
    original, retrain = _read(out / "models" / "original"), _read(out / "models" / "retrain")
    scrub = _read(out / "scrub")
    rewound = scrub.get("rewound") or {}
    sources = {
        "original": (original["metrics"], original.get("train_seconds")),
        "retrain": (retrain["metrics"], retrain.get("train_seconds")),
        "scrub": (scrub["metrics"], scrub.get("train_seconds")),
        "scrub+r": (rewound.get("metrics") or {}, scrub.get("train_seconds")),
    }
    retrain_seconds = num(retrain.get("train_seconds"))
    rows = []
    for method in METHODS:
        metrics, seconds = sources[method]
        row = {"method": method, **{k: _round(metrics.get(k), 4) for k in ROW_KEYS}}
        row["seconds"] = _round(seconds, 3)
        row["seconds_vs_retrain"] = (
            _round(num(seconds) / retrain_seconds, 4)
            if num(seconds) is not None and retrain_seconds
            else None
        )
        rows.append(row)
    return rows, scrub


def evaluate_checks(rows: list[dict]) -> list[dict]:
    by = {r["method"]: r for r in rows}
    s, rt, o = by["scrub"], by["retrain"], by["original"]

    def diff(a, b):
        return None if a is None or b is None else a - b

    checks = []
    d = diff(s["forget_error"], rt["forget_error"])
    checks.append(
        {
            "check": f"SCRUB's forget error within {FORGET_TOL:g} points of Retrain's",
            "passed": None if d is None else abs(d) <= FORGET_TOL,
            "detail": f"SCRUB {fmt(s['forget_error'])}% vs Retrain {fmt(rt['forget_error'])}% "
            f"(difference {fmt(d, '+.2f')} points)",
        }
    )
    d = diff(s["test_error"], o["test_error"])
    note = " (lower than Original's)" if d is not None and d < -TEST_TOL else ""
    checks.append(
        {
            "check": f"SCRUB's test error within {TEST_TOL:g} points of Original's",
            "passed": None if d is None else abs(d) <= TEST_TOL,
            "detail": f"SCRUB {fmt(s['test_error'])}% vs Original {fmt(o['test_error'])}% "
            f"(difference {fmt(d, '+.2f')} points){note}",
        }
    )
    ratio = s["seconds_vs_retrain"]
    checks.append(
        {
            "check": f"SCRUB's time at most {TIME_RATIO:g} of Retrain's",
            "passed": None if ratio is None else ratio <= TIME_RATIO,
            "detail": f"SCRUB {fmt(s['seconds'], '.1f')} s vs Retrain {fmt(rt['seconds'], '.1f')} s "
            f"(ratio {fmt(ratio, '.3f')})",
        }
    )
    return checks


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("PASS" if passed else "MISS")


def plot_errors(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars: forget / retain / test error per method (Agg canvas, no pyplot)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = {"forget_error": "tab:red", "retain_error": "tab:blue", "test_error": "tab:green"}
    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = np.arange(len(rows))
    width = 0.26
    for i, key in enumerate(ERROR_KEYS):
        ys = [np.nan if r[key] is None else r[key] for r in rows]
        bars = ax.bar(xs + (i - 1) * width, ys, width, color=colours[key], label=key.replace("_", " "))
        ax.bar_label(bars, labels=[fmt(y, ".1f") for y in ys], fontsize=7, padding=1)
    ax.set_xticks(xs, [LABELS[r["method"]] for r in rows])
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, 118)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)


def results_table(rows: list[dict]) -> list[str]:
    header = [
        "method",
        "forget err %",
        "retain err %",
        "test err %",
        "val err %",
        "MIA %",
        "MIA-efficacy %",
        "seconds",
        "x Retrain time",
    ]
    body = [
        [r["method"]]
        + [fmt(r[k]) for k in ROW_KEYS]
        + [fmt(r["seconds"], ".1f"), fmt(r["seconds_vs_retrain"], ".3f")]
        for r in rows
    ]
    return md_table(header, body)


def render_markdown(result: dict) -> str:
    h, st, rows, checks = result["header"], result["settings"], result["rows"], result["checks"]
    sizes, train, method = st["data"], st["train"], st["method"]
    out = [
        f"# {result['title']}",
        "",
        *header_markdown(h),
        f"- Wall time: {result['wall_seconds']:.1f} s",
        "",
    ]
    out += ["## Results", "", *results_table(rows), ""]
    out += [
        "Errors and attacks in percent. `seconds` = the engine's `train_seconds`: the training / unlearning "
        "loop without its per-epoch evaluation (data loading, final scoring and export not included); SCRUB+R "
        "is the same run as SCRUB, rewound to a saved epoch, so it has the same time.",
        "",
    ]
    if st["scenario"] == "class":
        out += [
            "Class unlearning: test error is on the other classes (the forgotten class's is left out).",
            "",
        ]
    rw = result["rewound"]
    out += [
        f"SCRUB+R rewound to epoch {rw.get('epoch', '–')} (0 = the Original): target = SCRUB's final error on "
        f"the forget-validation set, {fmt(rw.get('target_error'))}%; forget error per epoch from epoch 0: "
        f"{', '.join(fmt(e) for e in rw.get('forget_errors') or []) or '–'}.",
        "",
    ]
    out += ["## Checks", ""]
    out += md_table(
        ["check", "result", "numbers"], [[c["check"], _verdict(c["passed"]), c["detail"]] for c in checks]
    )
    out += [""]
    out += [
        "## Plots",
        "",
        "![Forget / retain / test error per method](errors.png)",
        "",
        "SCRUB's run, per epoch (dashed: Retrain):",
        "",
        "![SCRUB errors per epoch](scrub/plots/errors.png)",
        "",
        "![SCRUB losses per step](scrub/plots/losses.png)",
        "",
    ]
    out += ["## Settings", ""]
    out += [
        f"- Scenario: {st['scenario']}; forget set: {st['forget']['description']} ({st['forget']['size']} "
        "examples)",
        f"- Data: `{st['dataset']}`, classes {sizes['classes']}; up to {st['max_per_class']} train rows per "
        f"class, {st['val_fraction']:.0%} of them held out as validation; up to {st['max_test_per_class']} "
        f"test rows per class -> train {sizes['train']} (retain {sizes['train'] - st['forget']['size']}, "
        f"forget {st['forget']['size']}), val {sizes['val']}, test {sizes['test']}",
        f"- Model: {st['arch']} at width {st['width']}, from scratch; seed {st['seed']}; "
        f"{st['num_threads']} torch thread(s)",
        f"- Original / Retrain recipe: {train['optimizer']} lr {train['lr']}, momentum {train.get('momentum')}, "
        f"weight decay {train['weight_decay']}, {train['epochs']} epochs, lr x0.1 after epochs "
        f"{train['lr_decay_epochs']}, batch {train['batch_size']}, augment {train['augment']}; Retrain = the "
        "same recipe and seed on D_r alone (not padded back to |D|); per-epoch evaluation while training: "
        f"{st['train_eval_every_epoch']}",
        f"- Size preset: {'--quick ' + json.dumps(QUICK) if st['quick'] else 'full (configs/demo.yaml sizes)'}",
        f"- Extra overrides: {st['extra_overrides'] or 'none'}",
        "",
        "SCRUB hyperparameters:",
        "",
        *md_table(["setting", "value"], [[k, json.dumps(v)] for k, v in method.items()]),
        "",
    ]
    out += [
        "## Runs",
        "",
        "- [Original](models/original/report.md), [Retrain](models/retrain/report.md), "
        "[SCRUB / SCRUB+R](scrub/report.md)",
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
    sizes, count = describe_data(args, base, log)
    base += scenario_overrides(args, count)
    # --set applies to both runs; eval.every_epoch from --set only affects training (SCRUB+R needs it).
    train_cfg = load_config(
        args.config,
        base
        + [
            _ov("output_dir", str(models)),
            _ov("model.path", str(models / "original")),
            _ov("eval.every_epoch", not args.quick),
        ]
        + args.overrides,
    )
    scrub_cfg = load_config(
        args.config,
        base
        + [
            _ov("output_dir", str(out / "scrub")),
            _ov("model.path", str(models / "original")),
            _ov("eval.reference", str(models / "retrain")),
        ]
        + args.overrides
        + ["method.name=scrub", "method.rewind=true", "eval.every_epoch=true"],
    )
    train_every_epoch = train_cfg.eval.every_epoch

    log(f"training Original and Retrain -> {models}")
    run_training(train_cfg, log=lambda m: log(f"train | {m}"))
    log(f"unlearning with SCRUB (+R) -> {out / 'scrub'}")
    run_unlearning(scrub_cfg, log=lambda m: log(f"scrub | {m}"))

    rows, scrub_report = collect_rows(out)
    checks = evaluate_checks(rows)
    forget = scrub_report.get("forget") or {}
    dataset_name = Path(train_cfg.data.dataset).name or train_cfg.data.dataset
    title = (
        f"SCRUB, small scale: {args.scenario} unlearning on {dataset_name} "
        f"({len(sizes['classes'])} classes, {train_cfg.model.arch} x{train_cfg.model.width})"
        + (" [--quick]" if args.quick else "")
    )
    settings = {
        "scenario": args.scenario,
        "quick": args.quick,
        "dataset": train_cfg.data.dataset,
        "data": sizes,
        "max_per_class": train_cfg.data.max_per_class,
        "max_test_per_class": train_cfg.data.max_test_per_class,
        "val_fraction": train_cfg.data.val_fraction,
        "forget": forget,
        "arch": train_cfg.model.arch,
        "width": train_cfg.model.width,
        "seed": train_cfg.seed,
        "num_threads": train_cfg.backend.num_threads,
        "train": train_cfg.train.model_dump(mode="json"),
        "train_eval_every_epoch": train_every_epoch,
        "method": scrub_cfg.method.model_dump(mode="json"),
        "extra_overrides": args.overrides,
        "config": str(args.config),
    }
    rewound = scrub_report.get("rewound") or {}
    result = {
        "rows": rows,
        "title": title,
        "header": header,
        "settings": settings,
        "checks": checks,
        "rewound": {k: rewound.get(k) for k in ("epoch", "target_error", "forget_errors")},
        "wall_seconds": time.perf_counter() - t_start,
    }
    plot_errors(rows, out / "errors.png", title)
    write_json(out / "results.json", result)
    write_text(out / "results.md", render_markdown(result))

    print()
    print(title)
    print("\n".join(results_table(rows)))
    print()
    for c in checks:
        print(f"{_verdict(c['passed'])}  {c['check']}: {c['detail']}")
    print(f"\nwall time {result['wall_seconds']:.1f} s; results in {out / 'results.md'}")
    return result


if __name__ == "__main__":
    from engine.errors import EngineError

    try:
        main()
    except EngineError as exc:  # a bad dataset / label / override: the engine's message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
