"""Does each method pass a challenge-grade audit: can the best threshold attack tell its unlearned models from
retrained ones, example by example?

Trains one Original (configs/demo.yaml's model on real CIFAR-10), then runs `unlearn audit` for each method: K
unlearnings of the Original (seeds 1..K) against K retrained references and, for LiRA, K models trained on D.
The references are trained by the first audit and reused by the others (one cache). Reports per method the
NeurIPS 2023 Machine Unlearning Challenge score (forgetting quality F x retain- and test-accuracy ratios), the
LiRA AUC (unlearned vs retrained, 0.5 = indistinguishable) and the time ratio to Retrain.

    python -m benchmarks.audit_methods --out runs/audit --k 8    # 100 images/class, K=8
    python -m benchmarks.audit_methods --out /tmp/audit --quick  # same protocol, K=3, minutes
    python -m benchmarks.audit_methods --out DIR --methods scrub,scrub+r,finetune --scenario class

Writes ``DIR/results.json`` (``rows``: a method's score, F, ratios, LiRA AUC, times), ``DIR/results.md``; each
audit's own ``audit.md`` (epsilon histogram, worst examples, run times) is under ``DIR/audits/METHOD``.
"""

from __future__ import annotations

import json
import time

from benchmarks import kit
from benchmarks.kit import ov

# the methods at the settings of benchmarks/methods.yaml (shared with vision_compare.py); "scrub+r" = SCRUB
# rewound, audited on its rewound model
SIZES = {"data.max_per_class": 100, "data.max_test_per_class": 100}  # 80 train + 20 val per class
QUICK = {"data.max_per_class": 50, "data.max_test_per_class": 50, "audit.k": 3}
COLUMNS = [("method", "method"), ("score", "score", ".4f"), ("F", "forgetting_quality", ".4f"),
           ("F if indistinguishable", "null_forgetting_quality", ".3f"),
           ("retain ratio", "retain_ratio", ".3f"), ("test ratio", "test_ratio", ".3f"),
           ("LiRA AUC", "lira_auc", ".3f"), ("x Retrain time", "unlearn_vs_retrain", ".3f"),
           ("audit seconds", "seconds", ".0f")]  # fmt: skip
NOTE = ("score = F x retain ratio x test ratio (the challenge's); F = mean over forget examples of 2 / 2^n, "
        "n the 0.5-wide bin of the example's epsilon from the best threshold attack on log p_y - log(1 - "
        "p_y) of K unlearned vs K retrained models (1 = indistinguishable). LiRA AUC: 0.5 = "
        "indistinguishable from retraining. x Retrain time: mean unlearning loop time / mean retraining loop "
        "time. The first audit trains the references; later ones reuse them (audit seconds).")  # fmt: skip


def parse_args(argv: list[str] | None = None):
    p = kit.parser(__doc__, "same protocol, smaller: minutes on 2 cores", vision=True)
    p.add_argument("--k", type=int, default=8, help="models per side (--quick: 3)")
    p.add_argument("--methods", default="scrub,scrub+r,finetune", help=f"comma-separated, from {kit.METHODS}")
    p.add_argument("--scenario", choices=("random", "class"), default="random", help="what to forget")
    p.add_argument("--fraction", type=float, default=0.1, help="random: fraction of the train set to forget")
    args = p.parse_args(argv)
    args.methods = kit.choose(p, args.methods, kit.METHODS, "methods")
    if args.k < 2:
        p.error("--k must be at least 2")
    return args


def overrides(args, out) -> tuple[dict, list[str]]:
    """The sizes (--quick's or --k) and the overrides every run starts from."""
    sizes = {**SIZES, **QUICK} if args.quick else {**SIZES, "audit.k": args.k}
    base = kit.vision_overrides(args, **sizes, **{"model.path": str(out / "models" / "original"),
                                                  "audit.cache_dir": str(out / "references")})  # fmt: skip
    return sizes, base + kit.forget_overrides(args.scenario, args.fraction)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = kit.Run(args, argv)
    log, out = run.log, run.out

    from engine.config import load_config
    from engine.recipes.audit import run_audit
    from engine.recipes.train import run_training

    sizes, base = overrides(args, out)
    train_cfg = load_config(
        args.config, base + [ov("output_dir", str(out / "models")), "eval.every_epoch=false"] + args.set
    )
    log(f"training the Original -> {out / 'models' / 'original'}")
    run_training(train_cfg, targets=("original",), log=lambda m: log(f"original | {m}"))

    rows = []
    for method in args.methods:
        folder = out / "audits" / method
        cfg = load_config(
            args.config, base + kit.method_overrides(method) + [ov("output_dir", str(folder))] + args.set
        )
        log(f"audit of {method} (K={cfg.audit.k}) -> {folder}")
        t = time.perf_counter()
        run_audit(cfg, log=lambda m, method=method: log(f"{method} | {m}"))
        a = kit.read_json(folder / "audit.json")
        keys = ("score", "forgetting_quality", "null_forgetting_quality", "retain_ratio", "test_ratio")
        rows.append({"method": method, **{k: a[k] for k in keys},
                     "lira_auc": (a.get("lira") or {}).get("auc"), "seconds": time.perf_counter() - t,
                     "unlearn_vs_retrain": a["seconds"]["unlearn_vs_retrain"],
                     "references_reused": a["cache"]["reused"]})  # fmt: skip
    first = kit.read_json(out / "audits" / args.methods[0] / "audit.json")
    title = (
        f"Challenge-grade audit, K={first['k']}: {first['forget']['description']} "
        f"({train_cfg.model.arch} x{train_cfg.model.width})" + (" [--quick]" if args.quick else "")
    )
    result = {"rows": rows, "title": title, "header": run.header, "forget": first["forget"], "k": first["k"],
              "settings": {"sizes": sizes, "scenario": args.scenario,
                           "methods": {m: kit.method_overrides(m) for m in args.methods},
                           "train": train_cfg.train.model_dump(mode="json"), "extra_overrides": args.set},
              "wall_seconds": run.seconds()}  # fmt: skip
    return run.finish(result, render(result), *kit.table(rows, COLUMNS))


def render(result: dict) -> str:
    st, forget = result["settings"], result["forget"]
    reports = ", ".join(f"[{r['method']}](audits/{r['method']}/audit.md)" for r in result["rows"])
    lines = ["## Results", "", *kit.table(result["rows"], COLUMNS), "", NOTE, ""]
    lines += ["Per-method reports: " + reports, "", "## Settings", "",
              f"- Forget set: {forget['description']} ({forget['size']} examples)",
              f"- Sizes: {json.dumps(st['sizes'])}; scenario {st['scenario']}; extra overrides: "
              f"{st['extra_overrides'] or 'none'}",
              f"- Original / references recipe: `{json.dumps(st['train'])}`",
              *[f"- {m}: `{' '.join(o)}`" for m, o in st["methods"].items()], ""]  # fmt: skip
    return kit.document(result["title"], result["header"], lines, result["wall_seconds"])


if __name__ == "__main__":
    kit.main(main)
