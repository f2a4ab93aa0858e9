"""What does a SCRUB step cost on a real-size causal LM on one GPU: tokens per second, model FLOPs
utilisation (MFU) and peak GPU memory, next to a plain fine-tuning step of the same model in the same process?

Two configurations (``--config``), one per run:

- ``switches`` (default; issue 19 point 6): the engine's one-process backend with the switches of point 3:
  ``engine.backends.single.SingleProcessBackend(dtype="bf16")`` (forwards under ``backend.autocast()``, bf16
  autocast; weights, gradients and AdamW state fp32: what ``backend.dtype=bf16`` with ``model.dtype=float32``
  runs), ``model.gradient_checkpointing`` on (``enable_gradient_checkpointing``: non-reentrant, per decoder
  layer), ``model.attn_implementation`` = ``flash_attention_2`` when ``flash_attn`` imports on a GPU, else
  ``sdpa`` (recorded), the cross-entropy and the divergence chunked by ``--chunk-rows``. ``--weights bf16``
  holds the weights (and so AdamW's state) in bf16 instead: faster, not the engine's default (updates
  smaller than bf16's resolution are lost);
- ``zero3``: the earlier protocol: ``engine.backends.deepspeed.DeepSpeedBackend`` (configs/deepspeed/zero3.json,
  world size 1, DeepSpeed's bf16 section: bf16 weights, fp32 master weights), models built under
  ``HfDeepSpeedConfig`` so ``zero.Init`` partitions them as they are built, sdpa, no checkpointing.

Protocol (one process; for ``zero3`` a world of one, nccl on a GPU / gloo on CPU):

1. a Llama-style causal LM from a ``LlamaConfig`` with random weights (seed 0). Full default: the
   TinyLlama-1.1B shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000,
   untied embeddings: 1.1 B parameters); ``--quick``: hidden 64, 2 layers, vocab 512, on CPU (``switches``:
   the same autocast bf16, ``zero3``: fp32). ``switches`` builds it directly on the device
   (``with torch.device(...)``), so no CPU copy is made;
2. the student is ``prepare``d by the backend with the method's torch ``AdamW`` (lr 5e-5, weight decay 0, as
   configs/tofu.yaml's method). The frozen teacher (a second model, same weights dtype) is built and
   ``prepare_frozen`` only before the first mode that runs it, so the modes before it hold no teacher, as
   a run with a teacher cache loads none;
3. the teacher cache (``engine.teacher_cache.fill_teacher_cache``), filled before the first step from the
   student (which equals the teacher then), as the engine fills it: ``--cache-batches`` batches of random
   rows (default 4), the engine's budget (``method.teacher_cache_bytes``, 1 GiB; ``--quick`` 64 KiB) and
   top-k (64): beyond the budget the engine keeps the top 64 logits per token + a tail bucket
   (``TopKLogits``), which at the default size it does (4 x 8 x 1023 tokens x 32000 x 4 bytes = 4.2 GB);
   ``results.json`` ``teacher_cache`` says which and the fill's seconds;
4. random token ids (fixed seed), [batch, seq_len], every token counted, padded by the engine's ``collate``
   and moved to the device once; step k uses cached batch k mod ``--cache-batches``. A step is the engine
   loop's (engine/loop.py): the teacher's logits (``token_logits`` under ``no_grad`` and
   ``backend.autocast()``, or ``TeacherCache.lookup``), the student's (under ``backend.autocast()``), the
   method's own ``loss`` (engine/methods: ``Erm``, ``Scrub``) divided by its count, ``backend.backward``,
   ``backend.step``, ``loss.item()``. Modes, in this order, each ``--warmup`` untimed steps then ``--steps``
   timed ones:
   - ``finetune``: student forward + mean token cross-entropy (``Erm``) + backward + step;
   - ``scrub_min_cached`` / ``scrub_max_cached``: SCRUB's min-step (gamma * CE + alpha * T^2 * KL(t || s)) /
     max-step (-T^2 * KL(t || s) - forget_nll * CE) with the teacher's logits looked up in the cache: no
     teacher forward, no teacher in memory;
   - ``scrub_min`` / ``scrub_max``: the same with a teacher forward (no grad) every step.
   T = gamma = alpha = forget_nll = 1 as in configs/tofu.yaml (``--forget-nll 0``: the faithful max-step).
   On a GPU ``torch.cuda.synchronize()`` brackets each timed step. tokens/s = batch * seq_len * steps /
   timed seconds.
5. MFU = tokens/s x model FLOPs per token / the device's peak dense bf16 FLOP/s. Model FLOPs per token:
   6 N for a training step (forward 2 N + backward 4 N), + 2 N for a teacher forward (``scrub_min`` /
   ``scrub_max``; the cached modes have none), where N is the parameter count WITHOUT the input embedding
   (a lookup, no matmul) and WITH the output head (a [hidden x vocab] matmul per token): 1,034,512,384 at
   the default shape. Not counted: the attention scores (``mfu_attn`` adds PaLM's 12 L H T per token for each
   forward + backward, 4 L H T per teacher forward), the losses, and gradient checkpointing's recompute
   (``hfu`` counts it: + 2 N). The peak comes from a table keyed by ``torch.cuda.get_device_name()``
   (``PEAK_BF16_TFLOPS``: H100 SXM 989, H100 PCIe 756, H100 NVL / H200 NVL 835, H200 / GH200 989, A100 312;
   NVIDIA's dense, non-sparse bf16 figures); an unknown name gives ``mfu`` null with the name recorded;
   ``--peak-tflops`` overrides it.
6. memory: on a GPU ``torch.cuda.reset_peak_memory_stats()`` before each mode (warm-up included) and
   ``max_memory_allocated()`` after it, next to what is allocated when the mode starts (the student's
   state, the teacher once built; AdamW's state is created by the first finetune step). On CPU the host's
   peak RSS of the whole process so far (``getrusage``), which can only grow from one mode to the next.

It imports the engine's backends, methods, forward, teacher cache and collate (it needs no ``datasets``),
never a copy of them: what it times is what `unlearn run` runs.

Writes ``DIR/results.json`` ({"config", "switches", "device", "peak_tflops", "model": {"params",
"params_matmul", "shape"}, "teacher_cache", "modes": {mode: {...}}, ...}) and ``DIR/results.md`` (the table),
atomically, after every mode (a run cut short keeps the modes it finished), and prints the table.
``--max-seconds S``: no mode starts once S seconds have passed (or when the last mode's time would pass
S), those modes are recorded as skipped. Exit status 0 only when every mode ran with finite losses.

Here (CPU, tiny model, same code paths, well under a minute each):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_scrub_throughput.py --out /tmp/gpu_quick --quick
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_scrub_throughput.py --out /tmp/gpu_quick_z3 --quick --config zero3

On the lent GPU machine run ``bash benchmarks/gpu_session.sh`` with ``carry: [".whl"]`` (it installs the
wheels the machine lacks and runs this, the LoRA memory benchmark and the sync_batchnorm check). Shape,
batch and steps: ``--hidden --intermediate --layers --heads --kv-heads --vocab --batch --seq-len --steps
--warmup``; switches: ``--gradient-checkpointing on|off --attn auto|sdpa|flash_attention_2|eager
--weights fp32|bf16 --modes``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import importlib.util
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

MODES = ("finetune", "scrub_min_cached", "scrub_max_cached", "scrub_min", "scrub_max")
CONFIGS = ("switches", "zero3")
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
# Peak dense (not 2:4-sparse) bf16 tensor-core TFLOP/s from NVIDIA's datasheets, matched in this order against
# torch.cuda.get_device_name() in lower case (the SXM parts are named e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H200")
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h200 nvl", 835.0),
    ("gh200", 989.0),
    ("h100", 989.0),
    ("h200", 989.0),
    ("a100", 312.0),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    p.add_argument(
        "--quick", action="store_true", help="tiny model, a few steps (CPU check of the code path)"
    )
    p.add_argument(
        "--config", choices=CONFIGS, default="switches", help="switches (default) or zero3 (module docstring)"
    )
    for key in FULL:
        p.add_argument(
            "--" + key.replace("_", "-"),
            type=int,
            default=None,
            help=f"default {FULL[key]}, quick {QUICK[key]}",
        )
    p.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, run in the order {','.join(MODES)}"
    )
    p.add_argument(
        "--gradient-checkpointing",
        choices=("on", "off"),
        default=None,
        help="default on for switches, off for zero3",
    )
    p.add_argument(
        "--attn",
        choices=("auto", "sdpa", "flash_attention_2", "eager"),
        default=None,
        help="auto (switches' default): flash_attention_2 when flash_attn imports on a GPU, else sdpa; zero3: sdpa",
    )
    p.add_argument(
        "--weights",
        choices=("fp32", "bf16"),
        default="fp32",
        help="switches: the weights' dtype under bf16 autocast (fp32: the engine's mixed precision)",
    )
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="zero3: DeepSpeed's precision (default bf16 on a GPU, fp32 on CPU); switches: the autocast "
        "dtype (default bf16)",
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
    p.add_argument("--cache-batches", type=int, default=4, help="batches of rows the teacher cache holds")
    p.add_argument(
        "--teacher-cache-bytes",
        type=int,
        default=None,
        help="the cache's full-logits budget (default the engine's 2**30; quick 2**16: top-k as at full size)",
    )
    p.add_argument(
        "--teacher-cache-topk", type=int, default=64, help="the engine's method.teacher_cache_topk"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense bf16 peak; default from PEAK_BF16_TFLOPS",
    )
    p.add_argument("--max-seconds", type=float, default=0.0, help="start no mode after this; 0 = no limit")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    asked = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not asked or set(asked) - set(MODES):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    args.modes = [m for m in MODES if m in asked]
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = "on" if args.config == "switches" else "off"
    if args.attn is None:
        args.attn = "auto" if args.config == "switches" else "sdpa"
    if args.teacher_cache_bytes is None:
        args.teacher_cache_bytes = 2**16 if args.quick else 2**30
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


def peak_tflops(device_name: str | None, override: float | None) -> tuple[float | None, str]:
    """The device's peak dense bf16 TFLOP/s and where it came from (None: unknown, so no MFU)."""
    if override:
        return override, "--peak-tflops"
    if device_name is None:
        return None, "no GPU: no peak, no MFU"
    low = device_name.lower()
    for key, value in PEAK_BF16_TFLOPS:
        if key in low:
            return value, f"PEAK_BF16_TFLOPS[{key!r}] (NVIDIA datasheet, dense bf16)"
    return None, f"{device_name!r} is not in PEAK_BF16_TFLOPS: MFU not computed"


def resolve_attn(choice: str, cuda: bool) -> tuple[str, str]:
    """(attn_implementation, why). auto: flash_attention_2 when flash_attn imports on a GPU, else sdpa."""
    if choice != "auto":
        return choice, "asked"
    if not cuda:
        return "sdpa", "auto: no GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "auto: flash_attn is not installed"
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # an installed build that does not match this torch/CUDA
        return "sdpa", f"auto: flash_attn does not import ({type(exc).__name__}: {str(exc)[:120]})"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():  # e.g. a flash_attn version this transformers does not accept
        return "sdpa", "auto: flash_attn imports but transformers does not accept it"
    return "flash_attention_2", "auto: flash_attn imports and transformers accepts it"


class RandomRows:
    """A stream (the protocol engine/teacher_cache.py and the loop read): ``n`` rows of random token ids, every
    token an answer token; ``get(rows)`` pads them with the engine's ``collate`` and says which rows they are."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int):
        from engine.data.text import collate

        self.collate = collate
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, seq_len), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, rows: torch.Tensor, seed: int = 0) -> dict:
        batch = self.collate(
            [{"input_ids": self.ids[int(i)], "labels": self.ids[int(i)]} for i in rows], pad_id=0
        )
        batch["rows"] = rows
        return batch


# --- the run ------------------------------------------------------------------------------------------------


def methods(args) -> dict:
    """mode -> (the engine's method, its phase, where the teacher's logits come from): what the loop runs."""
    from engine.methods import Erm, ErmConfig, Scrub, ScrubConfig

    opt = {"optimizer": "adamw", "lr": args.lr, "weight_decay": 0.0}
    scrub = Scrub(ScrubConfig(temperature=args.temperature, gamma=args.gamma, alpha=args.alpha,
                              forget_nll=args.forget_nll, chunk_rows=args.chunk_rows or None,
                              teacher_cache_topk=args.teacher_cache_topk,
                              teacher_cache_bytes=args.teacher_cache_bytes, **opt))  # fmt: skip
    erm = Erm(ErmConfig(lr_decay_epochs=[], **opt))
    return {
        "finetune": (erm, "min", "none"),
        "scrub_min_cached": (scrub, "min", "cached"),
        "scrub_max_cached": (scrub, "max", "cached"),
        "scrub_min": (scrub, "min", "live"),
        "scrub_max": (scrub, "max", "live"),
    }


class Run:
    """The models, the backend, the batches and the cache of one configuration."""

    def __init__(self, args, backend, build, cuda: bool):
        self.args, self.backend, self.build, self.cuda = args, backend, build, cuda
        self.student = self.teacher = self.cache = None
        self.batches: list[dict] = []
        self.k = 0

    def next_batch(self) -> dict:
        batch = self.batches[self.k % len(self.batches)]
        self.k += 1
        return batch

    def ensure_teacher(self) -> float:
        """Build and freeze the teacher (once); returns the seconds it took."""
        if self.teacher is not None:
            return 0.0
        t0 = time.perf_counter()
        with self.backend.init_context():  # ZeRO-3: partitioned as it is built
            teacher = self.build()
        self.teacher = self.backend.prepare_frozen(teacher)
        sync(self.cuda)
        return time.perf_counter() - t0

    def one_step(self, mode: str) -> float:
        """One optimizer step as engine/loop.py takes it (one micro-batch that is the whole global batch)."""
        from engine.models.causal_lm import token_logits

        method, phase, source = self.args.methods[mode]
        backend, batch = self.backend, self.next_batch()
        t_rows = None
        if source == "cached":
            t_rows = self.cache.lookup("retain", batch)
        elif source == "live":
            with torch.no_grad(), backend.autocast():
                t_rows = token_logits(self.teacher, batch)
        with backend.autocast():
            s_rows = token_logits(self.student, batch)
        terms = method.loss(phase, s_rows, t_rows, batch["labels"], batch=batch)
        loss = terms.total / max(terms.count, 1)
        backend.backward(loss)
        backend.step()
        return float(loss.detach().float().cpu())  # the engine's loop reads every step's loss

    def run_mode(self, mode: str) -> dict:
        args, cuda = self.args, self.cuda
        teacher_seconds = self.ensure_teacher() if args.methods[mode][2] == "live" else 0.0
        self.student.train()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start_alloc = torch.cuda.memory_allocated() if cuda else None
        t0 = time.perf_counter()
        losses = [self.one_step(mode) for _ in range(args.warmup)]
        sync(cuda)
        warmup_seconds = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            sync(cuda)
            t0 = time.perf_counter()
            losses.append(self.one_step(mode))
            sync(cuda)
            times.append(time.perf_counter() - t0)
        seconds = sum(times)
        tokens = args.batch * args.seq_len * args.steps
        row = {
            "teacher": args.methods[mode][2],
            "teacher_resident": self.teacher is not None,
            "tokens_per_s": tokens / seconds,
            "s_per_step": seconds / args.steps,
            "step_seconds": times,
            "warmup_seconds": warmup_seconds,
            "teacher_build_seconds": teacher_seconds,
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
            row.update(
                peak_bytes=host_peak_rss(), peak_kind="host peak RSS of the process so far (not per mode)"
            )
        return row


def flops(results: dict, mode: str) -> dict:
    """Per token: model FLOPs (6N, + 2N for a teacher forward), with attention (PaLM's 12LHT per forward +
    backward, 4LHT per forward), and hardware FLOPs (+ 2N for the checkpointing recompute)."""
    m = results["model"]
    n, attn = m["params_matmul"], 12.0 * m["shape"]["layers"] * m["shape"]["hidden"] * results["seq_len"]
    teacher = results["modes"][mode]["teacher"] == "live"
    model = 6.0 * n + (2.0 * n if teacher else 0.0)
    with_attn = model + attn + (attn / 3.0 if teacher else 0.0)
    hardware = model + (2.0 * n if results["switches"]["gradient_checkpointing"] else 0.0)
    return {"model": model, "model_attn": with_attn, "hardware": hardware}


def add_ratios(results: dict) -> None:
    base = results["modes"].get("finetune")
    peak = results["peak_tflops"]
    for mode, row in results["modes"].items():
        if "error" in row or "skipped" in row:
            continue
        f = flops(results, mode)
        row["model_flops_per_token"] = f["model"]
        row["model_tflops"] = row["tokens_per_s"] * f["model"] / 1e12
        row["mfu"] = row["model_tflops"] / peak if peak else None
        row["mfu_attn"] = row["tokens_per_s"] * f["model_attn"] / 1e12 / peak if peak else None
        row["hfu"] = row["tokens_per_s"] * f["hardware"] / 1e12 / peak if peak else None
        if base and "tokens_per_s" in base:
            row["time_vs_finetune"] = row["s_per_step"] / base["s_per_step"]
            row["tokens_per_s_vs_finetune"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["peak_vs_finetune"] = row["peak_bytes"] / base["peak_bytes"]


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(results: dict) -> str:
    m, s = results["model"], results["switches"]
    cuda = results["device"].startswith("cuda")
    peak = "peak GPU GiB (allocated)" if cuda else "host peak RSS GiB (process so far)"
    cache = results.get("teacher_cache") or {}
    stream = cache.get("streams", {}).get("retain", {})
    lines = [
        f"# SCRUB vs fine-tuning step throughput and MFU, config `{results['config']}`, one process",
        "",
        f"- device: {results['device']}; torch {results['torch']}, transformers {results['transformers']}, "
        f"deepspeed {results['deepspeed'] or 'not imported'}; peak {results['peak_tflops']} TFLOP/s bf16 ({results['peak_source']})",
        f"- backend: {s['backend']}; precision: {s['precision']}; gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}; attention {s['attn_implementation']} ({s['attn_why']})",
        f"- model: Llama, {m['params'] / 1e6:.1f} M parameters ({m['params_matmul'] / 1e6:.1f} M without the input "
        "embedding: the N of 6N), " + ", ".join(f"{k} {v}" for k, v in m["shape"].items()),
        f"- batch {results['batch']} x seq_len {results['seq_len']}, {results['warmup']} warm-up + "
        f"{results['steps']} timed steps per mode; {results['date']}",
    ]
    if stream:
        lines.append(
            f"- teacher cache: {stream['kind']}"
            + (
                f" (top {stream['topk']}, tail mass mean {stream['tail_mass_mean']:.3g})"
                if "topk" in stream
                else ""
            )
            + f", {stream['rows']} rows, {stream['bytes'] / 2**20:.1f} MiB, filled in {cache['seconds']:.1f} s"
        )
    lines += [
        f"- command: `{results['command']}`",
        "",
        f"| mode | teacher | tokens/s | s/step | time / finetune | {peak} | peak / finetune | TFLOP/s (6N) | MFU "
        "| MFU + attn | HFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in results["requested_modes"]:
        row = results["modes"].get(mode)
        blank = " | | | | | | | | |"
        if row is None:
            lines.append(f"| {mode} | not run" + blank)
        elif "skipped" in row:
            lines.append(f"| {mode} | skipped: {row['skipped'][:60]}" + blank)
        elif "error" in row:
            lines.append(f"| {mode} | failed: {row['error'][:80]}" + blank)
        else:
            ratio = f"{row['time_vs_finetune']:.3f}" if "time_vs_finetune" in row else "-"
            pratio = f"{row['peak_vs_finetune']:.3f}" if "peak_vs_finetune" in row else "-"
            lines.append(
                f"| {mode} | {row['teacher']} | {row['tokens_per_s']:,.0f} | {row['s_per_step']:.4f} | {ratio} | "
                f"{row['peak_bytes'] / GIB:.2f} | {pratio} | {row['model_tflops']:.3g} | {_pct(row['mfu'])} | "
                f"{_pct(row['mfu_attn'])} | {_pct(row['hfu'])} |"
            )
    lines += [
        "",
        "MFU: tokens/s x 6N FLOPs per token (+ 2N for a live teacher's forward) over the peak, N the parameters "
        "without the input embedding (the output head counted); MFU + attn adds 12LHT per token (4LHT for the "
        "teacher); HFU also counts gradient checkpointing's recomputed forward (+ 2N). The losses are not "
        "counted. time / finetune: seconds per step over the fine-tuning step's.",
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


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
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


def make_backend(args, cuda: bool):
    """(backend, weights dtype, build on the device?, what was used, in words)."""
    if args.config == "switches":
        from engine.backends.single import SingleProcessBackend

        autocast = args.dtype or "bf16"
        backend = SingleProcessBackend(device="auto", dtype=autocast)
        weights = torch.bfloat16 if args.weights == "bf16" else torch.float32
        precision = (
            f"torch.autocast {autocast} forwards (backend.dtype={autocast}); weights, gradients and AdamW state "
            f"{args.weights}"
            + (
                " (model.dtype=float32: the engine's mixed precision)"
                if args.weights == "fp32"
                else " (model.dtype=bfloat16: no fp32 master weights)"
            )  # fmt: skip
        )
        return backend, weights, True, "engine.backends.single.SingleProcessBackend", precision
    from engine.backends.deepspeed import DeepSpeedBackend
    from engine.config import BackendConfig

    name = args.dtype or ("bf16" if cuda else "fp32")
    # no launcher: the backend makes a world of one on loopback (nccl on a GPU, gloo on CPU)
    backend = DeepSpeedBackend(BackendConfig(name="deepspeed", zero_stage=3, dtype=name,
                                             deepspeed_config=str(REPO / "configs" / "deepspeed" / "zero3.json")))  # fmt: skip
    precision = f"DeepSpeed {name}" + (
        " (bf16 weights, fp32 master weights and AdamW state)" if name == "bf16" else ""
    )
    weights = torch.bfloat16 if name == "bf16" else torch.float32
    return (
        backend,
        weights,
        False,
        "engine.backends.deepspeed.DeepSpeedBackend ZeRO-3, world size 1",
        precision,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(REPO))  # the engine, from this checkout
    import transformers
    from transformers import LlamaForCausalLM

    from engine.models.causal_lm import check_attn_implementation, enable_gradient_checkpointing, token_logits
    from engine.teacher_cache import fill_teacher_cache

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    backend, weights, on_device, backend_name, precision = make_backend(args, cuda)
    ds = sys.modules.get("deepspeed")
    import_seconds = time.perf_counter() - wall0
    print(f"imports and backend {import_seconds:.1f} s: {backend_name}, {precision}", flush=True)
    device = backend.device
    attn, attn_why = resolve_attn(args.attn, cuda)
    check_attn_implementation(attn)
    cfg = llama_config(args)
    ckpt = args.gradient_checkpointing == "on"

    def build():
        torch.manual_seed(args.seed)
        with torch.device(device) if on_device else contextlib.nullcontext():  # switches: no CPU copy
            model = LlamaForCausalLM._from_config(copy.deepcopy(cfg), dtype=weights, attn_implementation=attn)
        if ckpt:
            enable_gradient_checkpointing(model)  # used in train mode only: a frozen teacher runs as usual
        return model

    args.methods = methods(args)
    scrub = args.methods["scrub_min"][0]
    t0 = time.perf_counter()
    with backend.init_context():  # ZeRO-3: partitioned as it is built
        student = build()
    params = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters())
    embed = args.vocab * args.hidden  # the input embedding is a lookup, not a matmul
    student, _ = backend.prepare(student, None, scrub.config.build_optimizer)
    sync(cuda)
    init_seconds = time.perf_counter() - t0
    run = Run(args, backend, build, cuda)
    run.student = student

    stream = RandomRows(args.batch * args.cache_batches, args.seq_len, args.vocab, args.seed)
    for k in range(args.cache_batches):
        rows = torch.arange(k * args.batch, (k + 1) * args.batch)
        run.batches.append({key: v.to(device) for key, v in stream.get(rows).items()})  # as backend.batches

    results = {
        "question": "tokens/s, MFU and peak memory of SCRUB min/max steps (teacher forward or cached) vs a "
        "fine-tuning step, one GPU",
        "config": args.config,
        "switches": {
            "backend": backend_name,
            "precision": precision,
            "gradient_checkpointing": ckpt,
            "attn_implementation": attn,
            "attn_why": attn_why,
            "chunk_rows": args.chunk_rows,
        },
        "device": f"cuda: {torch.cuda.get_device_name()}"
        if cuda
        else f"cpu: {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "deepspeed": getattr(ds, "__version__", None),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": {
            "params": params,
            "params_matmul": params - embed,
            "shape": {
                k: getattr(args, k)
                for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")
            },
            "weights_dtype": str(weights).removeprefix("torch."),
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
        "requested_modes": args.modes,
        "modes": {},
    }
    results["peak_tflops"], results["peak_source"] = peak_tflops(
        torch.cuda.get_device_name() if cuda else None, args.peak_tflops
    )
    if cuda:
        results["gpu_total_bytes"] = torch.cuda.get_device_properties(device).total_memory
        results["student_state_bytes_before_steps"] = torch.cuda.memory_allocated()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"built {params / 1e6:.1f} M parameters in {init_seconds:.1f} s on {results['device']}", flush=True)

    if any(args.methods[m][2] == "cached" for m in args.modes):
        # as the engine fills it: from the student before its first step (then equal to the teacher)
        run.cache = fill_teacher_cache(
            backend.unwrap(student), {"retain": stream}, token_logits, backend, batch_size=args.batch,
            temperature=args.temperature, topk=args.teacher_cache_topk, budget_bytes=args.teacher_cache_bytes,
            progress=False,
        )  # fmt: skip
        results["teacher_cache"] = run.cache.summary()
        print(
            f"teacher cache filled in {run.cache.seconds:.1f} s: {results['teacher_cache']['streams']}",
            flush=True,
        )
    save(args.out, results)

    ok, last = True, 0.0
    for mode in args.modes:
        elapsed = time.perf_counter() - wall0
        if args.max_seconds and elapsed + last > args.max_seconds:
            results["modes"][mode] = {
                "skipped": f"time budget: {elapsed:.0f} s of {args.max_seconds:.0f} s used"
            }
            ok = False
            print(f"{mode}: skipped (time budget)", flush=True)
            save(args.out, results)
            continue
        t_mode = time.perf_counter()
        try:
            results["modes"][mode] = run.run_mode(mode)
        except torch.OutOfMemoryError as exc:  # keep what ran; a later mode needs at least as much memory
            results["modes"][mode] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
            ok = False
        last = time.perf_counter() - t_mode
        row = results["modes"][mode]
        print(
            f"{mode}: " + (row["error"] if "error" in row else f"{row['tokens_per_s']:,.0f} tokens/s"),
            flush=True,
        )
        results["wall_seconds"] = time.perf_counter() - wall0
        save(args.out, results)
        if not ok:
            break
    results["wall_seconds"] = time.perf_counter() - wall0
    print(save(args.out, results), flush=True)
    print(f"wrote {args.out / 'results.json'} and results.md ({results['wall_seconds']:.1f} s)", flush=True)
    del run, student
    gc.collect()
    backend.close()
    rows = results["modes"].values()
    return 0 if ok and len(rows) == len(args.modes) and all(r.get("finite") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
