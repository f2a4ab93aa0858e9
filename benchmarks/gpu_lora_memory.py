"""How much GPU memory does SCRUB take with a LoRA student on a 7B-shaped causal LM on one GPU, and how much
without LoRA?

Protocol (one process, ``SingleProcessBackend(dtype="bf16")``; issue 19 point 6; benchmarks/README.md, "GPU
machine", gives it whole): a Llama in the Llama-2-7B shape with random weights, built on the device in bf16,
gradient checkpointing on (``--quick``: hidden 64, 2 layers, vocab 512 on CPU, same code). Variant ``lora``:
``apply_lora`` rank 16, all-linear, the teacher ``AdapterDisabled(student)``, as engine/recipes/unlearn.py
sets them up; variant ``full`` (``--full off`` skips it): every weight trained in bf16 (fp32 master weights
would not fit one GPU) and a second bf16 model as the teacher. ``--repeats`` (min-step, max-step) pairs of the
engine's own ``engine.loop.train_step`` + ``backend.step`` (parts timed, benchmarks/timing.py); memory:
``max_memory_allocated`` reset before each step, and the engine's ``backend.memory_report()``.

Writes ``DIR/results.json`` and ``DIR/results.md`` after each variant (a run cut short keeps what it
finished). Exit status 0 only when every variant asked for ran with finite losses (an out-of-memory ``full``
is recorded and also gives 1).

Here: ``OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.gpu_lora_memory --out /tmp/lora_quick --quick``
(a few seconds). On the lent GPU machine through ``bash benchmarks/gpu_session.sh`` (carry ``.whl``: peft
and accelerate travel as wheels). Without a GPU and without ``--quick`` it refuses (13.5 GB of bf16 weights).
"""

from __future__ import annotations

import gc
import math
import time

import torch

from benchmarks import kit, timing

FULL = dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, batch=4,
            seq_len=512)  # fmt: skip
QUICK = dict(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=4, vocab=512, batch=2, seq_len=32)


def parse_args(argv=None):
    p = kit.parser(__doc__, "tiny model (CPU check of the code path)")
    for key in FULL:
        p.add_argument(
            "--" + key.replace("_", "-"), type=int, help=f"default {FULL[key]}, quick {QUICK[key]}"
        )
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (the engine's default)")
    p.add_argument("--repeats", type=int, default=2, help="(min-step, max-step) pairs per variant")
    p.add_argument("--full", choices=("on", "off"), default="on", help="also the student without LoRA")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-seconds", type=float, default=0.0, help="start no variant after this; 0 = no limit")
    p.add_argument("--seed", type=int, default=0)
    return kit.fill(p.parse_args(argv), FULL, QUICK)


def variant(name: str, args, cuda: bool) -> dict:
    from engine.backends.single import SingleProcessBackend
    from engine.data.text import collate
    from engine.methods import Scrub, ScrubConfig
    from engine.methods.base import Phase
    from engine.models.causal_lm import token_logits
    from engine.models.lora import (
        AdapterDisabled,
        LoraSettings,
        apply_lora,
        is_adapter_parameter,
        lora_summary,
    )

    backend = SingleProcessBackend(device="auto", dtype="bf16")
    device = backend.device

    def build():  # on the device, in bf16: no fp32 or CPU copy; checkpointing as load_causal_lm, before LoRA
        return timing.llama(args, device, torch.bfloat16, args.attn, checkpointing=True)

    scrub = Scrub(ScrubConfig(temperature=1.0, gamma=1.0, alpha=1.0, forget_nll=1.0,
                              chunk_rows=args.chunk_rows or None, optimizer="adamw", lr=args.lr,
                              weight_decay=0.0))  # fmt: skip
    timing.reset_peak(cuda)
    allocated = torch.cuda.memory_allocated if cuda else lambda: None
    base0 = allocated()
    row: dict = {"variant": name, "allocated_at_start": base0}  # what an earlier variant left: 0 expected
    t0 = time.perf_counter()
    student = build()
    lora, summary = name == "lora", None
    if lora:
        settings = LoraSettings(rank=args.rank, alpha=args.lora_alpha, target_modules="all-linear")
        student = apply_lora(student, settings)
        summary = lora_summary(student, settings)
    student, _ = backend.prepare(student, None, scrub.config.build_optimizer)
    # the base weights with the adapters disabled, or a second model
    teacher = AdapterDisabled(backend.unwrap(student)) if lora else backend.prepare_frozen(build())
    if cuda:
        torch.cuda.synchronize()
    named = list(student.named_parameters())
    row.update(
        build_seconds=time.perf_counter() - t0,
        params_total=sum(p.numel() for _, p in named),
        params_trainable=sum(p.numel() for _, p in named if p.requires_grad),
        base_weight_bytes=timing.storage_bytes([p for n, p in named if not is_adapter_parameter(n)]),
        adapter_bytes=timing.storage_bytes([p for n, p in named if is_adapter_parameter(n)]),
        teacher_weight_bytes=0 if lora else timing.storage_bytes(teacher.parameters()),
        teacher="AdapterDisabled(student): the same base weights" if lora else "a second bf16 model",
        lora=summary,
        allocated_after_build=None if base0 is None else allocated() - base0,
        peak_during_build=timing.peak_bytes(cuda),
    )  # fmt: skip
    g = torch.Generator().manual_seed(args.seed)
    batches = {}
    for stream in ("retain", "forget"):
        ids = torch.randint(1, args.vocab, (args.batch, args.seq_len), generator=g).tolist()
        batch = collate([{"input_ids": r, "labels": r} for r in ids], pad_id=0)  # every token counted
        batches[stream] = {k: v.to(device) for k, v in batch.items()}
    clock, steps = timing.Clock(sync=torch.cuda.synchronize if cuda else None), []
    for _ in range(args.repeats):
        for phase, stream in (("min", "retain"), ("max", "forget")):
            timing.reset_peak(cuda)
            student.train()
            t = timing.timed_step(scrub, backend, student, teacher, Phase(phase, stream, args.batch),
                                  batches[stream], token_logits, clock)  # fmt: skip
            parts = {p: t.get(p, 0.0) for p in timing.PARTS}
            steps.append({"phase": phase, "seconds": t["total"], "loss": t["value"], "parts_s": parts,
                          "peak_bytes": timing.peak_bytes(cuda), "allocated_after": allocated()})  # fmt: skip
    meter = backend.memory_report()[0]  # measured by the engine right after an optimizer step
    row.update(steps=steps, peak_bytes=max(s["peak_bytes"] for s in steps),
               **{k: meter[k] for k in ("parameter_bytes", "gradient_bytes", "optimizer_bytes",
                                        "state_bytes")},
               finite=all(math.isfinite(s["loss"]) for s in steps),
               peak_kind="cuda max_memory_allocated, reset before each step" if cuda
               else "host peak RSS of the process so far")  # fmt: skip
    del student, teacher, batches, backend
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    print(f"{name}: peak {row['peak_bytes'] / kit.GiB:.2f} GiB", flush=True)
    return row


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / kit.GiB:.2f} GiB" if n >= 0.1 * kit.GiB else f"{n / 2**20:.2f} MiB"


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
    ]
    rows = []
    for name in results["requested"]:
        r = results["variants"].get(name)
        if r is None or "error" in r or "skipped" in r:
            rows.append(
                {"variant": name, "params": ("not run" if r is None else r.get("error") or r["skipped"])[:90]}
            )
        else:
            last = [x["seconds"] for x in r["steps"][-2:]]
            params = f"{_count(r['params_total'])} ({_count(r['params_trainable'])})"
            rows.append({**r, "params": params, "last": sum(last) / len(last)})
    sizes = [("base weights", "base_weight_bytes"), ("adapters", "adapter_bytes"),
             ("teacher weights", "teacher_weight_bytes"), ("gradients", "gradient_bytes"),
             ("optimizer state", "optimizer_bytes"), ("allocated after build", "allocated_after_build"),
             ("peak allocated", "peak_bytes")]  # fmt: skip
    columns = [("variant", "variant"), ("params (trainable)", "params"), *((h, k, _size) for h, k in sizes),
               ("s/step (last pair)", "last", ".3f")]  # fmt: skip
    lines += kit.table(rows, columns, right=1)
    lines += [
        "",
        "peak: the largest max_memory_allocated over the steps (reset before each); grads / optimizer: the "
        "engine's StateMeter right after an optimizer step. full: bf16 weights, gradients and AdamW state, a "
        "second bf16 model as the teacher.",
    ]
    if not results["device"].startswith("cuda"):
        lines.append(
            "On CPU the peak is the host's RSS of the process so far (it cannot drop between variants)."
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("no GPU: the 7B shape needs one (13.5 GB of bf16 weights); use --quick for the CPU check")
        return 2
    import peft

    question = ("peak GPU memory of SCRUB min/max steps with a LoRA student (teacher = adapters disabled) vs "
                "a full student, 7B-shaped Llama, one GPU")  # fmt: skip
    results = timing.gpu_header(cuda, question, peft=peft.__version__)
    keys = ("batch", "seq_len", "rank", "lora_alpha", "repeats", "chunk_rows")
    results.update(shape={k: getattr(args, k) for k in timing.LLAMA_SHAPE},
                   **{k: getattr(args, k) for k in keys},
                   step="engine.loop.train_step + backend.step", variants={},
                   requested=["lora"] + (["full"] if args.full == "on" else []))  # fmt: skip
    if cuda:
        results["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory

    def save() -> str:
        return kit.write_results(args.out, results, markdown(results))

    rows, ok = timing.budgeted(results["requested"], args.max_seconds, lambda name: variant(name, args, cuda),
                               results, "variants", save, wall0, ahead=False)  # fmt: skip
    print(f"wrote {args.out / 'results.json'} and results.md ({results['wall_seconds']:.1f} s)", flush=True)
    return 0 if ok and all(r.get("finite") for r in rows.values()) else 1


if __name__ == "__main__":
    kit.main(main)
