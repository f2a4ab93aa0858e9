"""How much GPU memory does SCRUB take with a LoRA student on a 7B-shaped causal LM on one GPU, and how much
without LoRA?

Protocol (one process, the engine's one-process backend; issue 19 point 6):

1. a Llama from a ``LlamaConfig`` in the Llama-2-7B shape (hidden 4096, intermediate 11008, 32 layers, 32
   heads, 32 KV heads, vocab 32000, untied embeddings: 6.74 B parameters) with random weights (seed 0),
   built directly on the device in bf16 (``with torch.device(...)``, ``_from_config(dtype=bfloat16)``: no
   fp32 or CPU copy), sdpa attention, ``model.gradient_checkpointing`` on (the engine's
   ``enable_gradient_checkpointing``); ``--quick``: hidden 64, 2 layers, vocab 512 on CPU, same code;
2. variant ``lora``: ``engine.models.lora.apply_lora`` with ``LoraSettings(rank=16, alpha=32,
   target_modules="all-linear")`` (every linear layer but the output head; peft keeps the adapters in
   fp32), the teacher ``AdapterDisabled(student)`` (the same base weights with the adapters off: one copy
   of the model), as engine/recipes/unlearn.py sets them up: what ``model.lora`` with ``model.dtype=bfloat16``
   runs;
   variant ``full`` (``--full off`` skips it): the same student without LoRA, every weight trained, and a
   second bf16 model as the frozen teacher (``prepare_frozen``). Weights, gradients and AdamW's state are
   bf16 (``model.dtype=bfloat16``): the engine's fp32-weight mixed precision would need 6.74 B x 16 bytes =
   108 GB of student state + a 27 GB fp32 teacher, more than one 141 GB H200 holds with activations;
3. ``engine.backends.single.SingleProcessBackend(dtype="bf16")``: forwards under ``backend.autocast()``,
   ``prepare`` with SCRUB's AdamW (lr 5e-5, weight decay 0); steps as engine/loop.py takes them: the
   teacher's logits under ``no_grad`` + autocast, the student's under autocast, ``Scrub.loss`` (T = gamma =
   alpha = forget_nll = 1, chunked by 4096 token rows) over its count, ``backend.backward``,
   ``backend.step``. ``--repeats`` (default 2) times one min-step (retain batch) then one max-step (forget
   batch), each batch ``--batch`` x ``--seq-len`` (4 x 512) random tokens, all counted;
4. memory: ``torch.cuda.reset_peak_memory_stats()`` before each step and ``max_memory_allocated()`` after it;
   what is allocated after the build and after ``prepare``; the engine's own measure of parameter /
   gradient / optimizer-state bytes right after an optimizer step (``backend.memory_report()``,
   engine/backends/memory.py); the base (frozen) and adapter bytes. On CPU: the host's peak RSS of the process
   so far.

Writes ``DIR/results.json`` and ``DIR/results.md`` after each variant (a run cut short keeps what it
finished). Exit status 0 only when every variant asked for ran with finite losses (an out-of-memory ``full``
is recorded and also gives 1).

Here: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_lora_memory.py --out /tmp/lora_quick --quick``
(a few seconds). On the lent GPU machine through ``bash benchmarks/gpu_session.sh`` (carry ``.whl``: peft
and accelerate travel as wheels). Without a GPU and without ``--quick`` it refuses (13.5 GB of bf16 weights).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

FULL = dict(
    hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, batch=4, seq_len=512
)
QUICK = dict(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=4, vocab=512, batch=2, seq_len=32)
GIB = 2**30
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    p.add_argument("--quick", action="store_true", help="tiny model (CPU check of the code path)")
    for key in FULL:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"default {FULL[key]}, quick {QUICK[key]}")  # fmt: skip
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (the engine's default)")
    p.add_argument("--repeats", type=int, default=2, help="(min-step, max-step) pairs per variant")
    p.add_argument("--full", choices=("on", "off"), default="on", help="also the student without LoRA")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-seconds", type=float, default=0.0, help="start no variant after this; 0 = no limit")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def allocated(cuda: bool) -> int | None:
    return torch.cuda.memory_allocated() if cuda else None


def peak(cuda: bool) -> int:
    if cuda:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def tensor_bytes(params) -> int:
    seen, total = set(), 0
    for p in params:
        if p.untyped_storage().data_ptr() not in seen:
            seen.add(p.untyped_storage().data_ptr())
            total += p.untyped_storage().nbytes()
    return total


def variant(name: str, args, cuda: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.backends.single import SingleProcessBackend
    from engine.data.text import collate
    from engine.methods import Scrub, ScrubConfig
    from engine.models.causal_lm import enable_gradient_checkpointing, token_logits
    from engine.models.lora import (
        AdapterDisabled,
        LoraSettings,
        apply_lora,
        is_adapter_parameter,
        lora_summary,
    )

    backend = SingleProcessBackend(device="auto", dtype="bf16")
    device = backend.device
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq_len),
                      tie_word_embeddings=False, use_cache=False)  # fmt: skip

    def build():
        torch.manual_seed(args.seed)
        with torch.device(device):  # on the device, in bf16: never an fp32 or CPU copy
            model = LlamaForCausalLM._from_config(copy.deepcopy(cfg), dtype=torch.bfloat16,
                                                  attn_implementation=args.attn)  # fmt: skip
        enable_gradient_checkpointing(model)  # as load_causal_lm, before apply_lora
        return model

    scrub = Scrub(ScrubConfig(temperature=1.0, gamma=1.0, alpha=1.0, forget_nll=1.0, chunk_rows=args.chunk_rows or None,
                              optimizer="adamw", lr=args.lr, weight_decay=0.0))  # fmt: skip
    reset_peak(cuda)
    base0 = allocated(cuda)
    row: dict = {"variant": name, "allocated_at_start": base0}  # what an earlier variant left: 0 expected
    t0 = time.perf_counter()
    student = build()
    lora = None
    if name == "lora":
        settings = LoraSettings(rank=args.rank, alpha=args.lora_alpha, target_modules="all-linear")
        student = apply_lora(student, settings)
        lora = lora_summary(student, settings)
    student, _ = backend.prepare(student, None, scrub.config.build_optimizer)
    if name == "lora":
        teacher = AdapterDisabled(backend.unwrap(student))  # the base weights, adapters disabled
    else:
        teacher = backend.prepare_frozen(build())
    if cuda:
        torch.cuda.synchronize()
    named = list(student.named_parameters())
    row.update(
        build_seconds=time.perf_counter() - t0,
        params_total=sum(p.numel() for _, p in named),
        params_trainable=sum(p.numel() for _, p in named if p.requires_grad),
        base_weight_bytes=tensor_bytes([p for n, p in named if not is_adapter_parameter(n)]),
        adapter_bytes=tensor_bytes([p for n, p in named if is_adapter_parameter(n)]),
        teacher_weight_bytes=0 if name == "lora" else tensor_bytes(list(teacher.parameters())),
        teacher="AdapterDisabled(student): the same base weights"
        if name == "lora"
        else "a second bf16 model",
        lora=lora,
        allocated_after_build=None if base0 is None else allocated(cuda) - base0,
        peak_during_build=peak(cuda),
    )
    g = torch.Generator().manual_seed(args.seed)
    batches = {}
    for stream in ("retain", "forget"):
        ids = torch.randint(1, args.vocab, (args.batch, args.seq_len), generator=g).tolist()
        batch = collate([{"input_ids": r, "labels": r} for r in ids], pad_id=0)  # every token counted
        batches[stream] = {k: v.to(device) for k, v in batch.items()}
    steps = []
    for _ in range(args.repeats):
        for phase, stream in (("min", "retain"), ("max", "forget")):
            batch = batches[stream]
            reset_peak(cuda)
            t0 = time.perf_counter()
            student.train()
            with torch.no_grad(), backend.autocast():
                t_rows = token_logits(teacher, batch)
            with backend.autocast():
                s_rows = token_logits(student, batch)
            terms = scrub.loss(phase, s_rows, t_rows, batch["labels"], batch=batch)
            loss = terms.total / max(terms.count, 1)
            backend.backward(loss)
            backend.step()
            value = float(loss.detach().float().cpu())
            del t_rows, s_rows, terms, loss
            if cuda:
                torch.cuda.synchronize()
            steps.append({"phase": phase, "seconds": time.perf_counter() - t0, "loss": value,
                          "peak_bytes": peak(cuda), "allocated_after": allocated(cuda)})  # fmt: skip
    meter = backend.memory_report()[0]  # measured by the engine right after an optimizer step
    row.update(
        steps=steps,
        peak_bytes=max(s["peak_bytes"] for s in steps),
        parameter_bytes=meter["parameter_bytes"],
        gradient_bytes=meter["gradient_bytes"],
        optimizer_bytes=meter["optimizer_bytes"],
        state_bytes=meter["state_bytes"],
        finite=all(math.isfinite(s["loss"]) for s in steps),
        peak_kind="cuda max_memory_allocated, reset before each step"
        if cuda
        else "host peak RSS of the process so far",
    )
    del student, teacher, batches, backend
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def markdown(results: dict) -> str:
    s = results["shape"]
    lines = [
        "# Peak memory of SCRUB steps, LoRA student vs full student, one process",
        "",
        f"- device: {results['device']}; torch {results['torch']}, transformers {results['transformers']}, "
        f"peft {results['peft']}",
        f"- model: Llama, {', '.join(f'{k} {v}' for k, v in s.items())}; bf16 weights built on the device, "
        "gradient checkpointing on, autocast bf16 (SingleProcessBackend(dtype='bf16')), sdpa",
        f"- LoRA rank {results['rank']} alpha {results['lora_alpha']} all-linear; batch {results['batch']} x "
        f"{results['seq_len']}; {results['repeats']} x (min-step, max-step); {results['date']}",
        f"- command: `{results['command']}`",
        "",
        "| variant | params (trainable) | base weights | adapters | teacher weights | gradients | optimizer state "
        "| allocated after build | peak allocated | s/step (last pair) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in results["requested"]:
        r = results["variants"].get(name)
        if r is None or "error" in r or "skipped" in r:
            why = "not run" if r is None else r.get("error") or r.get("skipped")
            lines.append(f"| {name} | {why[:90]} | | | | | | | | |")
            continue
        last = [x["seconds"] for x in r["steps"][-2:]]
        lines.append(
            f"| {name} | {_count(r['params_total'])} ({_count(r['params_trainable'])}) | "
            f"{_size(r['base_weight_bytes'])} | {_size(r['adapter_bytes'])} | {_size(r['teacher_weight_bytes'])} | "
            f"{_size(r['gradient_bytes'])} | {_size(r['optimizer_bytes'])} | {_size(r['allocated_after_build'])} | "
            f"{_size(r['peak_bytes'])} | {sum(last) / len(last):.3f} |"
        )
    lines += [
        "",
        "peak: the largest max_memory_allocated over the steps (reset before each); grads / optimizer: the engine's "
        "StateMeter right after an optimizer step. full: bf16 weights, gradients and AdamW state, a second bf16 "
        "model as the teacher.",
    ]
    if not results["device"].startswith("cuda"):
        lines.append(
            "On CPU the peak is the host's RSS of the process so far (it cannot drop between variants)."
        )
    return "\n".join(lines) + "\n"


def save(out: Path, results: dict) -> str:
    md = markdown(results)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "results.md", md)
    return md


def main(argv=None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("no GPU: the 7B shape needs one (13.5 GB of bf16 weights); use --quick for the CPU check")
        return 2
    sys.path.insert(0, str(REPO))  # the engine, from this checkout
    import peft
    import transformers

    results = {
        "question": "peak GPU memory of SCRUB min/max steps with a LoRA student (teacher = adapters disabled) vs "
        "a full student, 7B-shaped Llama, one GPU",
        "device": f"cuda: {torch.cuda.get_device_name()}" if cuda else f"cpu: {platform.machine()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "shape": {
            k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")
        },
        "batch": args.batch,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "repeats": args.repeats,
        "chunk_rows": args.chunk_rows,
        "requested": ["lora"] + (["full"] if args.full == "on" else []),
        "variants": {},
    }
    if cuda:
        results["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
    args.out.mkdir(parents=True, exist_ok=True)
    ok = True
    for name in results["requested"]:
        elapsed = time.perf_counter() - wall0
        if args.max_seconds and elapsed > args.max_seconds:
            results["variants"][name] = {
                "skipped": f"time budget: {elapsed:.0f} s of {args.max_seconds:g} s used"
            }
            ok = False
            save(args.out, results)
            continue
        try:
            results["variants"][name] = variant(name, args, cuda)
        except torch.OutOfMemoryError as exc:
            results["variants"][name] = {"error": f"out of memory: {str(exc).splitlines()[0][:300]}"}
            ok = False
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        r = results["variants"][name]
        print(
            f"{name}: " + (r["error"] if "error" in r else f"peak {r['peak_bytes'] / GIB:.2f} GiB"),
            flush=True,
        )
        results["wall_seconds"] = time.perf_counter() - wall0
        save(args.out, results)
    results["wall_seconds"] = time.perf_counter() - wall0
    print(save(args.out, results), flush=True)
    print(f"wrote {args.out / 'results.json'} and results.md ({results['wall_seconds']:.1f} s)", flush=True)
    return 0 if ok and all(r.get("finite") for r in results["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
