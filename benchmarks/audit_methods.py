"""Does each method pass a challenge-grade audit: can the best threshold attack tell its unlearned models from
retrained ones, example by example?

Trains one Original (configs/demo.yaml's model on real CIFAR-10), then runs `unlearn audit` for each method:
K unlearnings of the Original (seeds 1..K) against K retrained references and, for LiRA, K models trained on D.
The references are trained by the first audit and reused by the others (one cache). Reports per method the
NeurIPS 2023 Machine Unlearning Challenge score (forgetting quality F x retain- and test-accuracy ratios), the
LiRA AUC (unlearned vs retrained, 0.5 = indistinguishable) and the time ratio to Retrain.

    python benchmarks/audit_methods.py --out runs/audit --k 8                    # 100 images/class, K=8
    python benchmarks/audit_methods.py --out /tmp/audit --quick                  # same protocol, K=3, minutes
    python benchmarks/audit_methods.py --out DIR --methods scrub,scrub+r,finetune --scenario class

Writes ``DIR/results.json`` ({"rows": [{"method", "score", "forgetting_quality", "retain_ratio", "test_ratio",
"lira_auc", "unlearn_vs_retrain", "seconds"}], ...}), ``DIR/results.md``; each audit's own ``audit.md``
(per-example epsilon histogram, worst examples by id, run times) is under ``DIR/audits/METHOD``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:
    from _common import REPO, fmt, header_markdown, md_table, quiet_log, run_header, write_json, write_text
except ImportError:  # pragma: no cover
    from benchmarks._common import (
        REPO,
        fmt,
        header_markdown,
        md_table,
        quiet_log,
        run_header,
        write_json,
        write_text,
    )

DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"
# method label -> overrides of `unlearn audit` ("scrub+r" = SCRUB rewound, audited on its rewound model)
SCRUB = ["method=scrub", "method.forget_batch_size=16", "method.retain_batch_size=32"]
METHODS = {  # the settings of benchmarks/vision_compare.py
    "scrub": SCRUB,
    "scrub+r": [*SCRUB, "method.rewind=true"],
    "finetune": ["method=finetune", "method.epochs=10", "method.lr=0.01", "method.batch_size=32"],
    "neggrad_plus": ["method=neggrad_plus", "method.epochs=5", "method.lr=0.01", "method.batch_size=32"],
    "cf_k": ["method=cf_k", "method.epochs=10", "method.lr=0.01", "method.batch_size=32"],
    "eu_k": ["method=eu_k", "method.epochs=10", "method.batch_size=32"],
    "bad_teacher": ["method=bad_teacher", "method.epochs=1", "method.batch_size=32"],
    "fisher": ["method=fisher"],
}
SIZES = {"data.max_per_class": 100, "data.max_test_per_class": 100}  # 80 train + 20 val per class
QUICK = {"data.max_per_class": 50, "data.max_test_per_class": 50, "audit.k": 3}


def _ov(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--k", type=int, default=8, help="models per side (--quick: 3)")
    p.add_argument(
        "--methods", default="scrub,scrub+r,finetune", help=f"comma-separated, from {list(METHODS)}"
    )
    p.add_argument("--scenario", choices=("random", "class"), default="random", help="what to forget")
    p.add_argument("--fraction", type=float, default=0.1, help="random: fraction of the train set to forget")
    p.add_argument("--dataset", default=None, help=f"local folder/file or hub id (default: {DEFAULT_DATA})")
    p.add_argument("--quick", action="store_true", help="same protocol, smaller: minutes on 2 cores")
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="base config (default: configs/demo.yaml)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override applied last to every run (repeatable)")  # fmt: skip
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.k < 2:
        p.error("--k must be at least 2")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    header = run_header(sys.argv[1:] if argv is None else argv)

    from engine.config import load_config
    from engine.recipes.audit import run_audit
    from engine.recipes.train import run_training

    log = quiet_log(t_start)

    out = args.out.expanduser().resolve()
    spec = args.dataset
    dataset = (
        str(DEFAULT_DATA) if spec is None else (str(Path(spec).resolve()) if Path(spec).exists() else spec)
    )
    sizes = {**SIZES, **QUICK} if args.quick else {**SIZES, "audit.k": args.k}
    base = [_ov("data.dataset", dataset), "logging.progress=false", "overwrite=true", "backend.num_threads=1",
            _ov("model.path", str(out / "models" / "original")), _ov("audit.cache_dir", str(out / "references")),
            *[_ov(k, v) for k, v in sizes.items()]]  # fmt: skip
    if args.scenario == "random":
        base += ["forget.kind=random", _ov("forget.fraction", args.fraction), "forget.label=null"]
    else:
        base += ["forget.kind=class"]
    train_cfg = load_config(
        args.config,
        base + [_ov("output_dir", str(out / "models")), "eval.every_epoch=false"] + args.overrides,
    )
    log(f"training the Original -> {out / 'models' / 'original'}")
    run_training(train_cfg, targets=("original",), log=lambda m: log(f"original | {m}"))

    rows = []
    for method in args.methods:
        cfg = load_config(
            args.config,
            base + METHODS[method] + [_ov("output_dir", str(out / "audits" / method))] + args.overrides,
        )
        log(f"audit of {method} (K={cfg.audit.k}) -> {out / 'audits' / method}")
        t = time.perf_counter()
        run_audit(cfg, log=lambda m, method=method: log(f"{method} | {m}"))
        a = json.loads((out / "audits" / method / "audit.json").read_text())
        rows.append(
            {
                "method": method,
                "score": a["score"],
                "forgetting_quality": a["forgetting_quality"],
                "null_forgetting_quality": a["null_forgetting_quality"],
                "retain_ratio": a["retain_ratio"],
                "test_ratio": a["test_ratio"],
                "lira_auc": (a.get("lira") or {}).get("auc"),
                "unlearn_vs_retrain": a["seconds"]["unlearn_vs_retrain"],
                "seconds": time.perf_counter() - t,
                "references_reused": a["cache"]["reused"],
            }
        )
    first = json.loads((out / "audits" / args.methods[0] / "audit.json").read_text())
    title = (
        f"Challenge-grade audit, K={first['k']}: {first['forget']['description']} "
        f"({train_cfg.model.arch} x{train_cfg.model.width})" + (" [--quick]" if args.quick else "")
    )
    result = {"rows": rows, "title": title, "header": header, "forget": first["forget"], "k": first["k"],
              "settings": {"sizes": sizes, "scenario": args.scenario, "methods": {m: METHODS[m] for m in args.methods},
                           "train": train_cfg.train.model_dump(mode="json"), "extra_overrides": args.overrides},
              "wall_seconds": time.perf_counter() - t_start}  # fmt: skip
    write_json(out / "results.json", result)
    write_text(out / "results.md", render(result))
    print("\n" + "\n".join(table(rows)))
    print(f"\nwall time {result['wall_seconds']:.1f} s; results in {out / 'results.md'}")
    return result


def table(rows: list[dict]) -> list[str]:
    return md_table(
        ["method", "score", "F", "F if indistinguishable", "retain ratio", "test ratio", "LiRA AUC", "x Retrain time",
         "audit seconds"],
        [[r["method"], fmt(r["score"], ".4f"), fmt(r["forgetting_quality"], ".4f"),
          fmt(r.get("null_forgetting_quality"), ".3f"), fmt(r["retain_ratio"], ".3f"),
          fmt(r["test_ratio"], ".3f"), fmt(r["lira_auc"], ".3f"), fmt(r["unlearn_vs_retrain"], ".3f"),
          fmt(r["seconds"], ".0f")] for r in rows],
    )  # fmt: skip


def render(result: dict) -> str:
    st = result["settings"]
    return "\n".join(
        [f"# {result['title']}", "", *header_markdown(result["header"]), f"- Wall time: {result['wall_seconds']:.1f} s",
         "", "## Results", "", *table(result["rows"]), "",
         "score = F x retain ratio x test ratio (the challenge's); F = mean over forget examples of 2 / 2^n, n the "
         "0.5-wide bin of the example's epsilon from the best threshold attack on log p_y - log(1 - p_y) of K "
         "unlearned vs K retrained models (1 = indistinguishable). LiRA AUC: 0.5 = indistinguishable from "
         "retraining. x Retrain time: mean unlearning loop time / mean retraining loop time. The first audit "
         "trains the references; later ones reuse them (audit seconds).",
         "", "Per-method reports: " + ", ".join(f"[{r['method']}](audits/{r['method']}/audit.md)" for r in result["rows"]),
         "", "## Settings", "", f"- Forget set: {result['forget']['description']} ({result['forget']['size']} examples)",
         f"- Sizes: {json.dumps(st['sizes'])}; scenario {st['scenario']}; extra overrides: {st['extra_overrides'] or 'none'}",
         f"- Original / references recipe: `{json.dumps(st['train'])}`",
         *[f"- {m}: `{' '.join(o)}`" for m, o in st["methods"].items()], ""]
    )  # fmt: skip


if __name__ == "__main__":
    from engine.errors import EngineError

    try:
        main()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
