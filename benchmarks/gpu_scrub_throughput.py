"""What does a SCRUB step cost on a real-size causal LM on one GPU: tokens per second, model FLOPs
utilisation (MFU) and peak GPU memory, next to a plain fine-tuning step of the same model in the same process?

Two configurations (``--config``), one per run: ``switches`` (default; issue 19 point 6), the engine's
``SingleProcessBackend(dtype="bf16")`` (bf16 autocast; fp32 weights, or bf16 with ``--weights bf16``),
gradient checkpointing, ``flash_attention_2`` when ``flash_attn`` imports on a GPU (else ``sdpa``), losses
chunked by ``--chunk-rows``, the model built on the device; ``zero3``, the earlier protocol:
``DeepSpeedBackend`` ZeRO-3 at world size 1 (DeepSpeed bf16, ``zero.Init``), sdpa, no checkpointing.

A Llama in the TinyLlama-1.1B shape with random weights (``--quick``: hidden 64, 2 layers, vocab 512, on CPU,
the same code), AdamW, random token ids. Modes, in this order, each ``--warmup`` untimed then ``--steps``
timed steps of the engine's own ``engine.loop.train_step`` + ``backend.step``, its parts timed through
train_step's clock hook (benchmarks/timing.py): ``finetune`` (``Erm``), ``scrub_min_cached`` /
``scrub_max_cached`` (the teacher's logits from the engine's teacher cache, ``fill_teacher_cache``),
``scrub_min`` / ``scrub_max`` (a teacher forward every step). MFU = tokens/s x 6N FLOPs per token (+ 2N for a
teacher forward; N without the input embedding) / the device's dense bf16 peak (``PEAK_BF16_TFLOPS``, or
``--peak-tflops``). benchmarks/README.md ("GPU machine") gives the whole protocol.

Writes ``DIR/results.json`` and ``DIR/results.md`` after every mode. ``--max-seconds S``: no mode starts once
S seconds have passed (or would with the last mode's time). Exit status 0 only when every mode ran with finite
losses. On the lent GPU machine: ``bash benchmarks/gpu_session.sh``; here (CPU, tiny model, the same code
paths):

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.gpu_scrub_throughput --out /tmp/gpu_quick --quick
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.gpu_scrub_throughput --out /tmp/z3 --quick --config zero3
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks import kit, timing

MODES = ("finetune", "scrub_min_cached", "scrub_max_cached", "scrub_min", "scrub_max")
FULL = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=8,
            seq_len=1024, steps=10, warmup=3, teacher_cache_bytes=2**30)  # fmt: skip
QUICK = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, batch=2, seq_len=32,
             steps=3, warmup=1, teacher_cache_bytes=2**16)  # fmt: skip
# Peak dense (not 2:4-sparse) bf16 tensor-core TFLOP/s from NVIDIA's datasheets, matched in this order against
# torch.cuda.get_device_name() in lower case (SXM parts are named e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H200")
PEAK_BF16_TFLOPS = (("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h200 nvl", 835.0), ("gh200", 989.0),
                    ("h100", 989.0), ("h200", 989.0), ("a100", 312.0))  # fmt: skip


def parse_args(argv=None):
    p = kit.parser(__doc__, "tiny model, a few steps (CPU check of the code path)")
    add = p.add_argument
    add("--config", choices=("switches", "zero3"), default="switches", help="module docstring")
    for key in (*timing.LLAMA_SHAPE, "batch", "seq_len", "steps", "warmup"):
        add("--" + key.replace("_", "-"), type=int, help=f"default {FULL[key]}, quick {QUICK[key]}")
    add("--modes", default=",".join(MODES), help=f"comma-separated, run in the order {','.join(MODES)}")
    add("--gradient-checkpointing", choices=("on", "off"), help="default on for switches, off for zero3")
    add("--attn", choices=("auto", "sdpa", "flash_attention_2", "eager"),
        help="auto (switches' default): flash_attention_2 when flash_attn imports on a GPU, else sdpa; "
        "zero3: sdpa")  # fmt: skip
    add("--weights", choices=("fp32", "bf16"), default="fp32", help="switches: the weights' dtype under bf16 "
        "autocast (fp32: the engine's mixed precision)")  # fmt: skip
    add("--dtype", choices=("bf16", "fp32"), help="zero3: DeepSpeed's precision (default bf16 on a GPU, fp32 "
        "on CPU); switches: the autocast dtype (default bf16)")  # fmt: skip
    add("--lr", type=float, default=5e-5, help="AdamW learning rate (configs/tofu.yaml's method.lr)")
    add("--temperature", type=float, default=1.0)
    add("--gamma", type=float, default=1.0, help="weight of the CE in a min-step")
    add("--alpha", type=float, default=1.0, help="weight of the KL in a min-step")
    add("--forget-nll", type=float, default=1.0, help="NLL-ascent weight in a max-step; 0 = faithful")
    add("--chunk-rows", type=int, default=4096, help="token rows per KL chunk; 0 = no chunking")
    add("--cache-batches", type=int, default=4, help="batches of rows the teacher cache holds")
    add("--teacher-cache-bytes", type=int, help="the cache's full-logits budget (default the engine's 2**30; "
        "quick 2**16: top-k as at full size)")  # fmt: skip
    add("--teacher-cache-topk", type=int, default=64, help="the engine's method.teacher_cache_topk")
    add("--peak-tflops", type=float, help="the device's dense bf16 peak; default from PEAK_BF16_TFLOPS")
    add("--max-seconds", type=float, default=0.0, help="start no mode after this; 0 = no limit")
    add("--seed", type=int, default=0)
    args = kit.fill(p.parse_args(argv), FULL, QUICK)
    asked = kit.choose(p, args.modes, MODES, "--modes")
    args.modes = [m for m in MODES if m in asked]
    switches = args.config == "switches"
    args.gradient_checkpointing = args.gradient_checkpointing or ("on" if switches else "off")
    args.attn = args.attn or ("auto" if switches else "sdpa")
    return args


def peak_tflops(device_name: str | None, override: float | None) -> tuple[float | None, str]:
    """The device's peak dense bf16 TFLOP/s and where it came from (None: unknown, so no MFU)."""
    if override:
        return override, "--peak-tflops"
    if device_name is None:
        return None, "no GPU: no peak, no MFU"
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name.lower():
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


def methods(args) -> dict:
    """mode -> (the engine's method, its phase, where the teacher's logits come from): what the loop runs.
    Every mode steps on the same batches, so each phase reads the one stream the cache holds."""
    from engine.methods import Erm, ErmConfig, Scrub, ScrubConfig
    from engine.methods.base import Phase

    opt = {"optimizer": "adamw", "lr": args.lr, "weight_decay": 0.0}
    scrub = Scrub(ScrubConfig(temperature=args.temperature, gamma=args.gamma, alpha=args.alpha,
                              forget_nll=args.forget_nll, chunk_rows=args.chunk_rows or None,
                              teacher_cache_topk=args.teacher_cache_topk,
                              teacher_cache_bytes=args.teacher_cache_bytes, **opt))  # fmt: skip
    erm = Erm(ErmConfig(lr_decay_epochs=[], **opt))
    minimum, maximum = (Phase(name, "retain", args.batch) for name in ("min", "max"))
    return {"finetune": (erm, minimum, "none"), "scrub_min_cached": (scrub, minimum, "cached"),
            "scrub_max_cached": (scrub, maximum, "cached"), "scrub_min": (scrub, minimum, "live"),
            "scrub_max": (scrub, maximum, "live")}  # fmt: skip


class Run:
    """The models, the backend, the batches and the cache of one configuration."""

    def __init__(self, args, backend, build, cuda: bool, student):
        self.args, self.backend, self.build, self.cuda, self.student = args, backend, build, cuda, student
        self.teacher = self.cache = None
        self.batches: list[dict] = []
        self.k = 0
        self.clock = timing.Clock(sync=torch.cuda.synchronize if cuda else None)

    def ensure_teacher(self) -> float:
        """Build and freeze the teacher (once); returns the seconds it took."""
        if self.teacher is not None:
            return 0.0
        t0 = time.perf_counter()
        with self.backend.init_context():  # ZeRO-3: partitioned as it is built
            self.teacher = self.backend.prepare_frozen(self.build())
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def one_step(self, mode: str) -> dict:
        """One optimizer step as `unlearn run` takes it: engine.loop.train_step, then backend.step()."""
        from engine.models.causal_lm import token_logits

        method, phase, source = self.args.methods[mode]
        batch = self.batches[self.k % len(self.batches)]
        self.k += 1
        teacher = self.teacher if source == "live" else None
        cache = self.cache if source == "cached" else None
        return timing.timed_step(method, self.backend, self.student, teacher, phase, batch, token_logits,
                                 self.clock, cache)  # fmt: skip

    def run_mode(self, mode: str) -> dict:
        args, cuda = self.args, self.cuda
        teacher_seconds = self.ensure_teacher() if args.methods[mode][2] == "live" else 0.0
        self.student.train()
        if cuda:
            torch.cuda.empty_cache()
        timing.reset_peak(cuda)
        start_alloc = torch.cuda.memory_allocated() if cuda else None
        t0 = time.perf_counter()
        losses = [self.one_step(mode)["value"] for _ in range(args.warmup)]
        warmup_seconds = time.perf_counter() - t0
        steps = [self.one_step(mode) for _ in range(args.steps)]
        losses += [s["value"] for s in steps]
        times = [s["total"] for s in steps]
        seconds = sum(times)
        parts = {p: sorted(s.get(p, 0.0) for s in steps)[len(steps) // 2] for p in timing.PARTS}  # medians
        row = {"teacher": args.methods[mode][2], "teacher_resident": self.teacher is not None,
               "tokens_per_s": args.batch * args.seq_len * args.steps / seconds,
               "s_per_step": seconds / args.steps, "step_seconds": times, "parts_s": parts,
               "warmup_seconds": warmup_seconds, "teacher_build_seconds": teacher_seconds, "losses": losses,
               "finite": all(math.isfinite(x) for x in losses),
               "peak_bytes": timing.peak_bytes(cuda)}  # fmt: skip
        if cuda:
            row.update(peak_reserved_bytes=torch.cuda.max_memory_reserved(), start_bytes=start_alloc,
                       peak_kind="cuda max_memory_allocated for this mode")  # fmt: skip
        else:
            row.update(peak_kind="host peak RSS of the process so far (not per mode)")
        print(f"{mode}: {row['tokens_per_s']:,.0f} tokens/s", flush=True)
        return row


def add_ratios(results: dict) -> None:
    """Per mode: model FLOPs per token (6N, + 2N for a teacher forward), TFLOP/s and MFU; MFU with attention
    (``mfu_attn``: PaLM's 12LHT per forward + backward, 4LHT per forward) and with the checkpointing recompute
    (``hfu``: + 2N); the ratios to the fine-tuning step."""
    m, base, peak = results["model"], results["modes"].get("finetune"), results["peak_tflops"]
    n, attn = m["params_matmul"], 12.0 * m["shape"]["layers"] * m["shape"]["hidden"] * results["seq_len"]
    recompute = 2.0 * n if results["switches"]["gradient_checkpointing"] else 0.0
    for row in results["modes"].values():
        if "error" in row or "skipped" in row:
            continue
        live = row["teacher"] == "live"
        model = 6.0 * n + (2.0 * n if live else 0.0)
        row["model_flops_per_token"] = model
        row["model_tflops"] = row["tokens_per_s"] * model / 1e12
        row["mfu"] = row["model_tflops"] / peak if peak else None
        with_attn = model + attn + (attn / 3.0 if live else 0.0)
        row["mfu_attn"] = row["tokens_per_s"] * with_attn / 1e12 / peak if peak else None
        row["hfu"] = row["tokens_per_s"] * (model + recompute) / 1e12 / peak if peak else None
        if base and "tokens_per_s" in base:
            row["time_vs_finetune"] = row["s_per_step"] / base["s_per_step"]
            row["tokens_per_s_vs_finetune"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["peak_vs_finetune"] = row["peak_bytes"] / base["peak_bytes"]


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(results: dict) -> str:
    r, m, s = results, results["model"], results["switches"]
    cuda = r["device"].startswith("cuda")
    peak = "peak GPU GiB (allocated)" if cuda else "host peak RSS GiB (process so far)"
    cache = r.get("teacher_cache") or {}
    stream = cache.get("streams", {}).get("retain", {})
    checkpointing = "on" if s["gradient_checkpointing"] else "off"
    lines = [
        f"# SCRUB vs fine-tuning step throughput and MFU, config `{r['config']}`, one process", "",
        f"- device: {r['device']}; torch {r['torch']}, transformers {r['transformers']}, deepspeed "
        f"{r['deepspeed'] or 'not imported'}; peak {r['peak_tflops']} TFLOP/s bf16 ({r['peak_source']})",
        f"- backend: {s['backend']}; precision: {s['precision']}; gradient checkpointing {checkpointing}; "
        f"attention {s['attn_implementation']} ({s['attn_why']})",
        f"- model: Llama, {m['params'] / 1e6:.1f} M parameters ({m['params_matmul'] / 1e6:.1f} M without the "
        "input embedding: the N of 6N), " + ", ".join(f"{k} {v}" for k, v in m["shape"].items()),
        f"- batch {r['batch']} x seq_len {r['seq_len']}, {r['warmup']} warm-up + {r['steps']} timed steps "
        f"per mode; {r['date']}",
    ]  # fmt: skip
    if stream:
        top = (f" (top {stream['topk']}, tail mass mean {stream['tail_mass_mean']:.3g})"
               if "topk" in stream else "")  # fmt: skip
        lines.append(f"- teacher cache: {stream['kind']}{top}, {stream['rows']} rows, "
                     f"{stream['bytes'] / 2**20:.1f} MiB, filled in {cache['seconds']:.1f} s")  # fmt: skip
    rows = []
    for mode in r["requested_modes"]:
        row = r["modes"].get(mode)
        if row is None:
            rows.append({"mode": mode, "teacher": "not run"})
        elif "skipped" in row or "error" in row:
            why = f"skipped: {row['skipped'][:60]}" if "skipped" in row else f"failed: {row['error'][:80]}"
            rows.append({"mode": mode, "teacher": why})
        else:
            rows.append({**row, "mode": mode, "peak": row["peak_bytes"] / kit.GiB})
    columns = [("mode", "mode"), ("teacher", "teacher"), ("tokens/s", "tokens_per_s", ",.0f"),
               ("s/step", "s_per_step", ".4f"), ("time / finetune", "time_vs_finetune", ".3f"),
               (peak, "peak", ".2f"), ("peak / finetune", "peak_vs_finetune", ".3f"),
               ("TFLOP/s (6N)", "model_tflops", ".3g"), ("MFU", "mfu", _pct),
               ("MFU + attn", "mfu_attn", _pct), ("HFU", "hfu", _pct)]  # fmt: skip
    lines += [f"- command: `{r['command']}`", "", *kit.table(rows, columns, right=2)]
    lines += ["", "MFU: tokens/s x 6N FLOPs per token (+ 2N for a live teacher's forward) over the peak, N "
              "the parameters without the input embedding (the output head counted); MFU + attn adds 12LHT "
              "per token (4LHT for the teacher); HFU also counts gradient checkpointing's recomputed forward "
              "(+ 2N). The losses are not counted. time / finetune: seconds per step over the fine-tuning "
              "step's."]  # fmt: skip
    if not cuda:
        lines.append(
            "On CPU the memory column is the process's host peak RSS so far: it cannot drop between modes."
        )
    return "\n".join(lines) + "\n"


def save(out: Path, results: dict) -> str:
    add_ratios(results)
    return kit.write_results(out, results, markdown(results))


def make_backend(args, cuda: bool):
    """(backend, weights dtype, build on the device?, what was used, in words)."""
    if args.config == "switches":
        from engine.backends.single import SingleProcessBackend

        autocast = args.dtype or "bf16"
        weights = torch.bfloat16 if args.weights == "bf16" else torch.float32
        how = ("model.dtype=float32: the engine's mixed precision" if args.weights == "fp32"
               else "model.dtype=bfloat16: no fp32 master weights")  # fmt: skip
        precision = (f"torch.autocast {autocast} forwards (backend.dtype={autocast}); weights, gradients and "
                     f"AdamW state {args.weights} ({how})")  # fmt: skip
        backend = SingleProcessBackend(device="auto", dtype=autocast)
        return backend, weights, True, "engine.backends.single.SingleProcessBackend", precision
    from engine.backends.deepspeed import DeepSpeedBackend
    from engine.config import BackendConfig

    name = args.dtype or ("bf16" if cuda else "fp32")
    # no launcher: the backend makes a world of one on loopback (nccl on a GPU, gloo on CPU)
    path = kit.REPO / "configs" / "deepspeed" / "zero3.json"
    zero3 = BackendConfig(name="deepspeed", zero_stage=3, dtype=name, deepspeed_config=str(path))
    bf16 = " (bf16 weights, fp32 master weights and AdamW state)" if name == "bf16" else ""
    weights = torch.bfloat16 if name == "bf16" else torch.float32
    what = "engine.backends.deepspeed.DeepSpeedBackend ZeRO-3, world size 1"
    return DeepSpeedBackend(zero3), weights, False, what, f"DeepSpeed {name}{bf16}"


def main(argv=None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from engine.models.causal_lm import check_attn_implementation, token_logits
    from engine.teacher_cache import fill_teacher_cache

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    backend, weights, on_device, backend_name, precision = make_backend(args, cuda)
    import_seconds = time.perf_counter() - wall0
    print(f"imports and backend {import_seconds:.1f} s: {backend_name}, {precision}", flush=True)
    device = backend.device
    attn, attn_why = resolve_attn(args.attn, cuda)
    check_attn_implementation(attn)
    ckpt = args.gradient_checkpointing == "on"

    def build():  # switches: on the device, no CPU copy
        return timing.llama(args, device, weights, attn, ckpt, on_device)

    args.methods = methods(args)
    t0 = time.perf_counter()
    with backend.init_context():  # ZeRO-3: partitioned as it is built
        student = build()
    params = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters())
    embed = args.vocab * args.hidden  # the input embedding is a lookup, not a matmul
    student, _ = backend.prepare(student, None, args.methods["scrub_min"][0].config.build_optimizer)
    if cuda:
        torch.cuda.synchronize()
    init_seconds = time.perf_counter() - t0
    run = Run(args, backend, build, cuda, student)

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1, args.vocab, (args.batch * args.cache_batches, args.seq_len), generator=g)
    stream = timing.TokenRows(ids.tolist())
    for k in range(args.cache_batches):
        rows = torch.arange(k * args.batch, (k + 1) * args.batch)
        run.batches.append({key: v.to(device) for key, v in stream.get(rows).items()})  # as backend.batches

    question = ("tokens/s, MFU and peak memory of SCRUB min/max steps (teacher forward or cached) vs a "
                "fine-tuning step, one GPU")  # fmt: skip
    ds_version = getattr(sys.modules.get("deepspeed"), "__version__", None)
    results = timing.gpu_header(cuda, question, deepspeed=ds_version)
    shape = {k: getattr(args, k) for k in timing.LLAMA_SHAPE}
    losses = ("temperature", "gamma", "alpha", "forget_nll", "chunk_rows", "lr")
    results.update({
        "config": args.config,
        "switches": {"backend": backend_name, "precision": precision, "gradient_checkpointing": ckpt,
                     "attn_implementation": attn, "attn_why": attn_why, "chunk_rows": args.chunk_rows},
        "step": "engine.loop.train_step + backend.step", "modes": {},
        "model": {"params": params, "params_matmul": params - embed, "shape": shape,
                  "weights_dtype": str(weights).removeprefix("torch.")},
        **{k: getattr(args, k) for k in ("batch", "seq_len", "steps", "warmup")},
        "losses": {k: getattr(args, k) for k in losses},
        "import_seconds": import_seconds, "init_seconds": init_seconds, "requested_modes": args.modes,
    })  # fmt: skip
    name = torch.cuda.get_device_name() if cuda else None
    results["peak_tflops"], results["peak_source"] = peak_tflops(name, args.peak_tflops)
    if cuda:
        results["gpu_total_bytes"] = torch.cuda.get_device_properties(device).total_memory
        results["student_state_bytes_before_steps"] = torch.cuda.memory_allocated()
    print(f"built {params / 1e6:.1f} M parameters in {init_seconds:.1f} s on {results['device']}", flush=True)

    if any(args.methods[m][2] == "cached" for m in args.modes):
        # as the engine fills it: from the student before its first step (then equal to the teacher)
        run.cache = fill_teacher_cache(
            backend.unwrap(student), {"retain": stream}, token_logits, backend, batch_size=args.batch,
            temperature=args.temperature, topk=args.teacher_cache_topk, budget_bytes=args.teacher_cache_bytes,
            progress=False)  # fmt: skip
        results["teacher_cache"] = run.cache.summary()
        print(f"teacher cache filled in {run.cache.seconds:.1f} s: {results['teacher_cache']['streams']}",
              flush=True)  # fmt: skip
    save(args.out, results)

    rows, ok = timing.budgeted(args.modes, args.max_seconds, run.run_mode, results, "modes",
                               lambda: save(args.out, results), wall0, stop=True)  # fmt: skip
    print(f"wrote {args.out / 'results.json'} and results.md ({results['wall_seconds']:.1f} s)", flush=True)
    del run, student
    gc.collect()
    backend.close()
    return 0 if ok and len(rows) == len(args.modes) and all(r.get("finite") for r in rows.values()) else 1


if __name__ == "__main__":
    kit.main(main)
