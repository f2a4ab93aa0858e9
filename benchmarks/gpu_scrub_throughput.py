"""What does a SCRUB step cost on a real-size causal LM under DeepSpeed ZeRO-3 on one GPU: tokens per second
and peak GPU memory, next to a plain fine-tuning step of the same model in the same process?

Protocol (one process, world size 1, nccl on a GPU / gloo on CPU):

1. a Llama-style causal LM from a ``LlamaConfig`` with random weights (seed 0), built under
   ``HfDeepSpeedConfig`` so ``zero.Init`` partitions it as it is built, ``attn_implementation="sdpa"``.
   Full default: the TinyLlama-1.1B shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV
   heads, vocab 32000, untied embeddings: 1.1 B parameters), bf16; ``--quick``: hidden 64, 2 layers,
   vocab 512, fp32 on CPU;
2. the engine's own set-up: ``engine.backends.deepspeed.DeepSpeedBackend`` (configs/deepspeed/zero3.json,
   ZeRO-3, world size 1) builds both models inside its ``init_context()`` and ``prepare``s them: the student
   with the method's torch ``AdamW`` (lr 5e-5, weight decay 0, as configs/tofu.yaml's method; no DeepSpeed
   ``optimizer`` section, so no fused op is compiled), the teacher frozen and sharded without an optimizer;
3. random token ids (fixed seed), [batch, seq_len], every token counted, padded by the engine's
   ``collate``; a step is the engine loop's step: ``token_logits`` (engine/models/causal_lm.py) of the
   teacher (no grad) and of the student, the method's own ``loss`` (engine/methods: ``Erm``, ``Scrub``),
   divided by its count, ``backend.backward`` and ``backend.step``, in this order, three modes, each
   ``--warmup`` untimed steps then ``--steps`` timed ones:
   - ``finetune``: student forward + loss (mean token cross-entropy, ``Erm``) + backward + optimizer step;
   - ``scrub_min``: teacher forward (no grad) + student forward + gamma * CE + alpha * T^2 * KL(t || s) +
     backward + step (SCRUB's min-step);
   - ``scrub_max``: teacher forward + student forward + (-T^2 * KL(t || s) - forget_nll * CE) + backward +
     step (SCRUB's max-step); T = gamma = alpha = forget_nll = 1 as in configs/tofu.yaml
     (``--forget-nll 0``: the faithful max-step). The divergence is chunked by ``--chunk-rows`` token rows
     with activation checkpointing (engine/methods/losses.py's ``distill_kl_sum``; default 4096, the
     engine's).
   Every step ends with ``loss.item()`` as the engine's loop does; on a GPU ``torch.cuda.synchronize()``
   brackets each timed step. tokens/s = batch * seq_len * steps / timed seconds.
4. memory: on a GPU ``torch.cuda.reset_peak_memory_stats()`` before each mode (warm-up included) and
   ``max_memory_allocated()`` after it, next to what is allocated when the mode starts (the student's
   ZeRO-3 state and the teacher; AdamW's state is created by the first finetune step). On CPU there is
   no per-mode peak: the host's peak RSS of the whole process so far (``getrusage``) is reported, and
   it can only grow from one mode to the next.

It imports the engine's backend, methods, forward and collate (pydantic and DeepSpeed travel as wheels; it
needs no ``datasets``), never a copy of them: what it times is what `unlearn run` runs.

Writes ``DIR/results.json`` ({"device", "torch", "deepspeed", "model": {"params", "shape"}, "modes":
{"finetune": {...}, "scrub_min": {...}, "scrub_max": {...}}, ...}) and ``DIR/results.md`` (the table),
atomically, after every mode (a run cut short keeps the modes it finished), and prints the table.
Exit status 0 only when all three modes ran.

Here (CPU, tiny model, same code path, well under a minute):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_scrub_throughput.py --out /tmp/gpu_quick --quick

On the lent GPU machine (one H100 80 GB or H200; torch 2.11 + CUDA, transformers 5.17, Python 3.12, no
package index), DeepSpeed and pydantic travel as wheels in ``.whl/`` (git-ignored): run
``bash benchmarks/gpu_session.sh`` with ``carry: [".whl"]`` (it installs them and runs this at the default
size: about 45 s on an H100 in the earlier, restated-loss version). Shape, batch and steps: ``--hidden
--intermediate --layers --heads --kv-heads --vocab --batch --seq-len --steps --warmup``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

MODES = ("finetune", "scrub_min", "scrub_max")
FULL = dict(
    hidden=2048,
    intermediate=5632,
    layers=22,
    heads=32,
    kv_heads=4,
    vocab=32000,
    batch=8,
    seq_len=1024,
    steps=10,
    warmup=3,
)
QUICK = dict(
    hidden=64,
    intermediate=128,
    layers=2,
    heads=4,
    kv_heads=2,
    vocab=512,
    batch=2,
    seq_len=32,
    steps=3,
    warmup=1,
)
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    p.add_argument(
        "--quick", action="store_true", help="tiny model, a few steps (CPU check of the code path)"
    )
    for key in FULL:
        p.add_argument(
            "--" + key.replace("_", "-"),
            type=int,
            default=None,
            help=f"default {FULL[key]}, quick {QUICK[key]}",
        )
    p.add_argument(
        "--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 on a GPU, fp32 on CPU"
    )
    p.add_argument(
        "--lr", type=float, default=5e-5, help="AdamW learning rate (configs/tofu.yaml's method.lr)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=1.0, help="weight of the CE in a min-step")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the KL in a min-step")
    p.add_argument(
        "--forget-nll", type=float, default=1.0, help="NLL-ascent weight in a max-step; 0 = faithful"
    )
    p.add_argument("--chunk-rows", type=int, default=4096, help="token rows per KL chunk; 0 = no chunking")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# --- small helpers (benchmarks/_common.py imports engine.eval.report, hence matplotlib: not used here) -------

REPO = Path(__file__).resolve().parents[1]


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def host_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


# --- the run ------------------------------------------------------------------------------------------------


def methods(args) -> dict:
    """mode -> (the engine's method, its phase): what the loop would run."""
    from engine.methods import Erm, ErmConfig, Scrub, ScrubConfig

    opt = {"optimizer": "adamw", "lr": args.lr, "weight_decay": 0.0}
    scrub = Scrub(ScrubConfig(temperature=args.temperature, gamma=args.gamma, alpha=args.alpha,
                              forget_nll=args.forget_nll, chunk_rows=args.chunk_rows or None, **opt))  # fmt: skip
    erm = Erm(ErmConfig(lr_decay_epochs=[], **opt))
    return {"finetune": (erm, "min"), "scrub_min": (scrub, "min"), "scrub_max": (scrub, "max")}


def one_step(mode: str, backend, student, teacher, batch: dict, args) -> float:
    """One optimizer step as engine/loop.py takes it (one micro-batch that is the whole global batch)."""
    from engine.models.causal_lm import token_logits

    method, phase = args.methods[mode]
    t_rows = None
    if method.needs_teacher:
        with torch.no_grad():
            t_rows = token_logits(teacher, batch)
    s_rows = token_logits(student, batch)
    terms = method.loss(phase, s_rows, t_rows, batch["labels"], batch=batch)
    loss = terms.total / max(terms.count, 1)
    backend.backward(loss)
    backend.step()
    return float(loss.detach().float().cpu())  # the engine's loop reads every step's loss


def run_mode(mode: str, backend, student, teacher, batch: dict, args, cuda: bool) -> dict:
    student.train()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start_alloc = torch.cuda.memory_allocated() if cuda else None
    t0 = time.perf_counter()
    losses = [one_step(mode, backend, student, teacher, batch, args) for _ in range(args.warmup)]
    sync(cuda)
    warmup_seconds = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        sync(cuda)
        t0 = time.perf_counter()
        losses.append(one_step(mode, backend, student, teacher, batch, args))
        sync(cuda)
        times.append(time.perf_counter() - t0)
    seconds = sum(times)
    tokens = args.batch * args.seq_len * args.steps
    row = {
        "tokens_per_s": tokens / seconds,
        "s_per_step": seconds / args.steps,
        "step_seconds": times,
        "warmup_seconds": warmup_seconds,
        "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
    }
    if cuda:
        row.update(
            peak_bytes=torch.cuda.max_memory_allocated(),
            peak_reserved_bytes=torch.cuda.max_memory_reserved(),
            start_bytes=start_alloc,
            peak_kind="cuda max_memory_allocated for this mode",
        )
    else:
        row.update(peak_bytes=host_peak_rss(), peak_kind="host peak RSS of the process so far (not per mode)")
    return row


def flops_per_token(n_matmul: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token (PaLM's 6N + 12 L H T; the loss not counted)."""
    return 6.0 * n_matmul + 12.0 * layers * hidden * seq_len


def add_ratios(results: dict) -> None:
    base = results["modes"].get("finetune")
    for mode, row in results["modes"].items():
        if "error" in row or not base or "error" in base:
            continue
        row["time_vs_finetune"] = row["s_per_step"] / base["s_per_step"]
        row["tokens_per_s_vs_finetune"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["peak_vs_finetune"] = row["peak_bytes"] / base["peak_bytes"]
        if results["model"].get("flops_per_token"):
            extra = 1.0 if mode == "finetune" else 4.0 / 3.0  # + the teacher's forward: 1/3 of fwd + bwd
            row["model_tflops"] = row["tokens_per_s"] * results["model"]["flops_per_token"] * extra / 1e12


def markdown(results: dict) -> str:
    m = results["model"]
    cuda = results["device"].startswith("cuda")
    peak = "peak GPU GiB (allocated)" if cuda else "host peak RSS GiB (process so far)"
    lines = [
        "# SCRUB vs fine-tuning step throughput, DeepSpeed ZeRO-3, world size 1",
        "",
        f"- device: {results['device']}; torch {results['torch']}, deepspeed {results['deepspeed']}, "
        f"transformers {results['transformers']}; {results['dtype']}",
        f"- model: Llama, {m['params'] / 1e6:.1f} M parameters, "
        + ", ".join(f"{k} {v}" for k, v in m["shape"].items()),
        f"- batch {results['batch']} x seq_len {results['seq_len']}, {results['warmup']} warm-up + "
        f"{results['steps']} timed steps per mode; {results['date']}",
        f"- command: `{results['command']}`",
        "",
        f"| mode | tokens/s | s/step | time / finetune | {peak} | peak / finetune | model TFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        row = results["modes"].get(mode)
        if row is None:
            lines.append(f"| {mode} | not run | | | | | |")
        elif "error" in row:
            lines.append(f"| {mode} | failed: {row['error'][:80]} | | | | | |")
        else:
            ratio = f"{row['time_vs_finetune']:.3f}" if "time_vs_finetune" in row else "-"
            pratio = f"{row['peak_vs_finetune']:.3f}" if "peak_vs_finetune" in row else "-"
            tf = f"{row['model_tflops']:.3g}" if "model_tflops" in row else "-"
            lines.append(
                f"| {mode} | {row['tokens_per_s']:,.0f} | {row['s_per_step']:.4f} | {ratio} | "
                f"{row['peak_bytes'] / GIB:.2f} | {pratio} | {tf} |"
            )
    lines += [
        "",
        "time / finetune: seconds per step over the fine-tuning step's (rule of thumb for SCRUB: 4/3, one extra "
        "forward on top of forward + backward). model TFLOP/s: 6N + 12LHT FLOPs per token (+1/3 for the teacher's "
        "forward), the loss not counted.",
    ]
    if not cuda:
        lines.append(
            "On CPU the memory column is the process's host peak RSS so far: it cannot drop between modes."
        )
    return "\n".join(lines) + "\n"


def save(out: Path, results: dict) -> str:
    add_ratios(results)
    md = markdown(results)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "results.md", md)
    return md


def main(argv=None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(REPO))  # the engine, from this checkout
    # after DS_ACCELERATOR is set; the model classes are imported before any zero.Init
    import deepspeed
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.backends.deepspeed import DeepSpeedBackend
    from engine.config import BackendConfig
    from engine.data.text import collate

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    import_seconds = time.perf_counter() - wall0
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    # no launcher: the backend makes a world of one on loopback (nccl on a GPU, gloo on CPU)
    backend = DeepSpeedBackend(BackendConfig(name="deepspeed", zero_stage=3, dtype=dtype_name,
                                             deepspeed_config=str(REPO / "configs" / "deepspeed" / "zero3.json")))  # fmt: skip
    print(f"imports {import_seconds:.1f} s, process group up {time.perf_counter() - wall0:.1f} s", flush=True)
    device = backend.device
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq_len),
        tie_word_embeddings=False,
        use_cache=False,
    )

    def build():
        torch.manual_seed(args.seed)
        return LlamaForCausalLM._from_config(copy.deepcopy(cfg), dtype=dtype, attn_implementation="sdpa")

    args.methods = methods(args)
    t0 = time.perf_counter()
    with backend.init_context():  # ZeRO-3: partitioned as they are built
        student, teacher = build(), build()
    params = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters())
    embed = args.vocab * args.hidden  # the input embedding is a lookup, not a matmul
    student, teacher = backend.prepare(student, teacher, args.methods["scrub_min"][0].config.build_optimizer)
    init_seconds = time.perf_counter() - t0

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq_len), generator=g).tolist()
    batch = collate([{"input_ids": row, "labels": row} for row in ids], pad_id=0)  # every token counted
    batch = {k: v.to(device) for k, v in batch.items()}

    results = {
        "question": "tokens/s and peak memory of SCRUB min/max steps vs a fine-tuning step, ZeRO-3, world size 1",
        "device": f"cuda: {torch.cuda.get_device_name()}"
        if cuda
        else f"cpu: {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": dtype_name,
        "zero_stage": 3,
        "world_size": 1,
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": {
            "params": params,
            "shape": {
                k: getattr(args, k)
                for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")
            },
            "flops_per_token": flops_per_token(params - embed, args.layers, args.hidden, args.seq_len),
        },
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "losses": {
            "temperature": args.temperature,
            "gamma": args.gamma,
            "alpha": args.alpha,
            "forget_nll": args.forget_nll,
            "chunk_rows": args.chunk_rows,
            "lr": args.lr,
        },
        "import_seconds": import_seconds,
        "init_seconds": init_seconds,
        "modes": {},
    }
    if cuda:
        results["gpu_total_bytes"] = torch.cuda.get_device_properties(device).total_memory
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"built 2 x {params / 1e6:.1f} M parameters in {init_seconds:.1f} s on {results['device']}",
        flush=True,
    )

    ok = True
    for mode in MODES:
        try:
            results["modes"][mode] = run_mode(mode, backend, student, teacher, batch, args, cuda)
        except torch.OutOfMemoryError as exc:  # keep what ran; a later mode needs at least as much memory
            results["modes"][mode] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
            ok = False
        row = results["modes"][mode]
        print(
            f"{mode}: " + (row["error"] if "error" in row else f"{row['tokens_per_s']:,.0f} tokens/s"),
            flush=True,
        )
        results["wall_seconds"] = time.perf_counter() - wall0
        save(args.out, results)
        if not ok:
            break
    print(save(args.out, results), flush=True)
    print(f"wrote {args.out / 'results.json'} and results.md ({results['wall_seconds']:.1f} s)", flush=True)
    backend.close()
    return 0 if ok and all(r.get("finite") for r in results["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
