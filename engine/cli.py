"""`unlearn train | run | eval CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from engine.errors import EngineError

HELP = {
    "train": "train the Original (on D) and the Retrain reference (on D_r) with one recipe",
    "run": "unlearn a checkpoint (method=scrub; method.rewind=true for SCRUB+R)",
    "eval": "score a checkpoint (model.path=...) on forget / retain / test / val with membership attacks",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn", description="SCRUB machine unlearning engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument(
            "overrides", nargs="*", help="key=value overrides, e.g. method.alpha=0.5 forget.label=cat"
        )
        if name == "train":
            p.add_argument("--only", choices=["original", "retrain"], help="train only one of the two models")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars drown the engine's own progress
    import datasets

    datasets.disable_progress_bars()
    try:
        from engine.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "train":
            from engine.recipes.train import TARGETS, run_training

            run_training(cfg, targets=(args.only,) if args.only else TARGETS)
        elif args.command == "run":
            from engine.recipes.unlearn import run_unlearning

            run_unlearning(cfg)
        else:
            from engine.recipes.evaluate import run_evaluation

            run_evaluation(cfg)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
