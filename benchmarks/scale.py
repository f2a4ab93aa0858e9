"""Does a SmolLM2-sized SCRUB run fit and keep its pace: memory and step time of the four ways to hold the
teacher, and the data path's per-worker memory as the retain set grows?

Part 1, the model (``rows``): a causal LM with SmolLM2-135M's shape (random weights, float32, also at
``--quick``), one batch of random token ids, AdamW. Four modes, each in a fresh subprocess so the peaks never
mix: ``full`` (the teacher a second full copy), ``teacher_cache`` (the teacher's outputs computed once by the
student; no teacher model), ``lora`` (the teacher ``AdapterDisabled``), ``lora+teacher_cache``. SCRUB
min-steps and fine-tuning steps alternate, each the engine's ``train_step`` + ``backend.step()``, its parts
timed (benchmarks/timing.py); ``step_ratio``: median SCRUB step / median fine-tuning step.

Part 2, the data path (``data``): for N = 10^3, 10^4, 10^5 synthetic rows in a token store, 2 worker processes
each read their share of one epoch as ``Backend.batches`` shards it: seconds per epoch and per-worker peak
next to the worker's file-backed resident pages (the store's). Writes ``DIR/results.json`` (``rows``,
``data``, ``goals``) and ``DIR/results.md``; benchmarks/README.md ("scale.py") gives the whole protocol.

    python -m benchmarks.scale --out runs/scale          # batch 4 x 64 tokens, 8 timed pairs per mode
    python -m benchmarks.scale --out /tmp/scale --quick  # batch 2 x 32 tokens, 4 timed pairs; same model
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import kit, timing
from benchmarks.kit import MiB, fmt

SEGMENTS = timing.PARTS  # the parts of a step, timed through engine.loop.train_step's clock hook
MODES = ("full", "teacher_cache", "lora", "lora+teacher_cache")
DATA_ROWS = (1_000, 10_000, 100_000)
WORKERS = 2
# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M), the fields that set the shape
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 100000.0,
                "rms_norm_eps": 1e-5}  # fmt: skip
GOAL_CACHE_RATIO = 1.05  # teacher_cache: SCRUB step / fine-tuning step
GOAL_LORA_PEAK = 0.6  # lora peak / full peak
DATA_TOLERANCE = 8 * 2**20  # per-worker peak growth 1e3 -> 1e5 beyond the store's resident pages
SELF = [sys.executable, "-m", "benchmarks.scale"]  # a child process: one mode, or one data worker


# --- part 1: one mode -----------------------------------------------------------------------------------


def run_mode(mode: str, batch_rows: int, seq_len: int, warmup: int, repeats: int, seed: int) -> dict:
    """One mode in this (fresh) process: build, time interleaved fine-tune / SCRUB steps, measure memory."""
    import peft  # noqa: F401  (imported before the baseline in every mode: library code is not the model's)
    import torch
    import transformers

    from engine.backends.single import SingleProcessBackend
    from engine.config import load_config
    from engine.methods import Erm, ErmConfig, Scrub
    from engine.methods.base import Phase
    from engine.models.causal_lm import token_logits
    from engine.models.lora import AdapterDisabled, LoraSettings, apply_lora
    from engine.teacher_cache import fill_teacher_cache

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rows = timing.TokenRows(torch.randint(0, SMOLLM2_135M["vocab_size"], (batch_rows, seq_len)).tolist())
    batch = rows.get(torch.arange(batch_rows))  # labels = the next tokens (collate shifts them)
    # the causal-LM recipe's SCRUB (configs/tofu.yaml: T = gamma = alpha = 1), not the vision defaults; fine-
    # tuning: ERM's loss, the cross-entropy over the counted tokens (one optimizer for both: the script's)
    methods = {"scrub": Scrub(load_config(kit.TOFU_CONFIG).method), "finetune": Erm(ErmConfig(augment=False))}
    lora, cached = mode.startswith("lora"), mode.endswith("teacher_cache")
    backend = SingleProcessBackend(device="cpu", num_threads=1)

    gc.collect()
    baseline = timing.rss()  # before the model exists
    t_build = time.perf_counter()
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)).float()
    teacher = cache = None
    if lora:
        student = apply_lora(student, LoraSettings(rank=16, alpha=32, target_modules="all-linear"))
    if not cached:
        teacher = AdapterDisabled(student) if lora else copy.deepcopy(student).eval().requires_grad_(False)
    else:  # computed once by the student (equal to the teacher then), as method.teacher_cache=auto does
        c = methods["scrub"].config
        cache = fill_teacher_cache(student, {"retain": rows}, token_logits, backend, batch_size=batch_rows,
                                   temperature=c.temperature, topk=c.teacher_cache_topk,
                                   budget_bytes=c.teacher_cache_bytes, progress=False)  # fmt: skip
    student.train()
    student, _ = backend.prepare(student, None, lambda params: torch.optim.AdamW(params, lr=1e-5))
    trainable = [p for p in student.parameters() if p.requires_grad]
    build_seconds = time.perf_counter() - t_build
    phase, clock = Phase("min", "retain", batch_rows), timing.Clock()

    def step(kind: str) -> dict[str, float]:
        """engine.loop.train_step + backend.step: seconds of each part (``SEGMENTS``) and ``total``."""
        live = kind == "scrub"
        t = timing.timed_step(methods[kind], backend, student, teacher if live else None, phase, batch,
                              token_logits, clock, cache if live else None)  # fmt: skip
        if t["value"] != t["value"]:
            raise RuntimeError(f"{mode}: non-finite loss")
        return {p: t.get(p, 0.0) for p in (*SEGMENTS, "total")}

    peak = timing.PeakMeter()
    peak.start()
    samples: dict[str, list[dict[str, float]]] = {"finetune": [], "scrub": []}
    for r in range(warmup + repeats):
        for kind in ("finetune", "scrub") if r % 2 == 0 else ("scrub", "finetune"):  # alternates per pair
            t = step(kind)
            if r >= warmup:
                samples[kind].append(t)
    times = {kind: [t["total"] for t in ts] for kind, ts in samples.items()}
    peak_rss = peak.peak()

    state = dict(backend.meter.max)  # counted at every optimizer step (a post-hook)
    teacher_bytes = timing.storage_bytes(teacher.parameters()) if teacher is not None and not lora else 0
    cache_bytes = 0 if cache is None else sum(st.nbytes for st in cache.streams.values())
    ft, sc = statistics.median(times["finetune"]), statistics.median(times["scrub"])
    pairs = list(zip(samples["scrub"], samples["finetune"]))
    extra = {p: statistics.median(s[p] - f[p] for s, f in pairs) for p in (*SEGMENTS, "total")}
    medians = {k: {p: statistics.median(t[p] for t in ts) for p in SEGMENTS} for k, ts in samples.items()}
    return {
        "mode": mode, "peak_bytes": peak_rss - baseline,
        "state_bytes": sum(state.values()) + teacher_bytes + cache_bytes, "step_ratio": sc / ft,
        "step_ratio_paired": statistics.median(s["total"] / f["total"] for s, f in pairs),
        "finetune_median_s": ft, "scrub_median_s": sc, "finetune_s": times["finetune"],
        "scrub_s": times["scrub"],
        # median seconds of each part; the SCRUB step's extra over the fine-tuning step, part by part
        # (median of the per-pair differences): what a busy machine's noise on the whole step hides
        "segments_s": medians, "extra_s": extra,
        # the ratio from the parts that differ (teacher forward or lookup, loss, backward): the student
        # forward and the optimizer step do the same work in both kinds, so their differences are noise only
        "step_ratio_from_parts": 1.0 + (extra["teacher"] + extra["loss"] + extra["backward"]) / ft,
        "state": {**state, "teacher_parameter_bytes": teacher_bytes, "teacher_cache_bytes": cache_bytes},
        "parameters": sum(p.numel() for p in student.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable), "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak_rss, "peak_kind": peak.kind, "build_seconds": build_seconds,
        "teacher_cache_api": "engine.teacher_cache.TeacherCache.lookup" if cached else None,
        "batch": {"rows": batch_rows, "tokens_per_row": seq_len, "counted_tokens": len(batch["labels"])},
        "warmup_pairs": warmup, "timed_pairs": repeats,
    }  # fmt: skip


# --- part 2: the data path ------------------------------------------------------------------------------


def write_store(folder: Path, n: int, min_len: int, max_len: int, seed: int) -> int:
    """A token store of ``n`` rows of random length in [min_len, max_len]; returns its size in bytes."""
    import numpy as np

    from engine.data.store import write_token_store

    rng = np.random.default_rng(seed)

    def batches(chunk: int = 1000):
        for lo in range(0, n, chunk):
            rows = range(lo, min(n, lo + chunk))
            ids = [rng.integers(1, 49152, int(rng.integers(min_len, max_len + 1))).tolist() for _ in rows]
            yield {"row": list(rows), "input_ids": ids, "labels": ids}

    write_token_store(folder, n, batches())
    return sum(f.stat().st_size for f in folder.iterdir())


def data_worker(folder: str, rank: int, batch_size: int, seed: int, sync: str) -> dict:
    """One rank's epoch of data reading (Backend.batches' sharding), after a barrier with the other ranks."""
    import torch

    from engine.backends.sampling import epoch_order
    from engine.data.store import TokenStore

    torch.set_num_threads(1)
    gc.collect()
    before = timing.proc_status("VmRSS", "RssFile")
    peak = timing.PeakMeter()
    peak.start()
    Path(sync, f"ready.{rank}").touch()
    while not Path(sync, "go").exists():
        time.sleep(0.005)
    t0 = time.perf_counter()
    store = TokenStore(folder, pad_id=0)
    steps = tokens = rows_read = 0
    for rows in epoch_order(len(store), seed, 0, "retain").split(batch_size):
        share = rows.tensor_split(WORKERS)[rank]
        if len(share):
            tokens += int(store.get(share)["attention_mask"].sum())
            rows_read += len(share)
        steps += 1
    seconds = time.perf_counter() - t0
    peak_rss = peak.peak()
    after = timing.proc_status("VmRSS", "RssFile")
    return {"rank": rank, "seconds": seconds, "peak_bytes": peak_rss - before["VmRSS"],
            "file_pages_bytes": after["RssFile"] - before["RssFile"],
            "rss_end_bytes": after["VmRSS"] - before["VmRSS"], "rows_read": rows_read, "tokens_read": tokens,
            "steps": steps, "peak_kind": peak.kind}  # fmt: skip


def run_data(n: int, args, root: Path) -> dict:
    folder, sync = root / f"store_{n}", root / f"sync_{n}"
    t0 = time.perf_counter()
    store_bytes = write_store(folder, n, args.min_len, args.max_len, args.seed)
    write_seconds = time.perf_counter() - t0
    sync.mkdir()
    procs = []
    for rank in range(WORKERS):
        out = sync / f"result.{rank}.json"
        cmd = [*SELF, "--_data-worker", str(folder), "--_rank", str(rank), "--_json", str(out),
               "--_sync", str(sync), "--data-batch-size", str(args.data_batch_size),
               "--seed", str(args.seed)]  # fmt: skip
        procs.append((subprocess.Popen(cmd, env=_child_env()), out))
    while not all((sync / f"ready.{r}").exists() for r in range(WORKERS)):
        if any(p.poll() not in (None, 0) for p, _ in procs):
            break
        time.sleep(0.01)
    (sync / "go").touch()
    results = []
    for p, out in procs:
        if p.wait() != 0:
            raise RuntimeError(f"data worker failed (exit {p.returncode}) for N={n}")
        results.append(kit.read_json(out))
    shutil.rmtree(folder, ignore_errors=True)
    worst = max(results, key=lambda r: r["peak_bytes"])
    return {"rows": n, "workers": WORKERS, "seconds_per_epoch_data": max(r["seconds"] for r in results),
            "peak_bytes_per_worker": worst["peak_bytes"], "file_pages_bytes": worst["file_pages_bytes"],
            "peak_minus_file_pages_bytes": worst["peak_bytes"] - worst["file_pages_bytes"],
            "store_bytes": store_bytes, "store_write_seconds": write_seconds,
            "batch_size": args.data_batch_size, "row_tokens": [args.min_len, args.max_len],
            "per_worker": results}  # fmt: skip


def _child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(kit.REPO), env.get("PYTHONPATH", "")]))
    return env


def run_mode_subprocess(mode: str, args, folder: Path) -> dict:
    out = folder / f"mode_{mode.replace('+', '_')}.json"
    cmd = [*SELF, "--_mode", mode, "--_json", str(out), "--seed", str(args.seed), "--batch-rows",
           str(args.batch_rows), "--seq-len", str(args.seq_len), "--warmup", str(args.warmup), "--repeats",
           str(args.repeats)]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, env=_child_env(), check=True)
    return {**kit.read_json(out), "process_seconds": time.perf_counter() - t0}


def _per(key: str, unit: float):  # a column: row[key] in unit (bytes in MiB, seconds in ms)
    return lambda row: row[key] / unit


def _state_split(r: dict) -> str:
    st = r["state"]
    parts = (st["parameter_bytes"] + st["teacher_parameter_bytes"], st["gradient_bytes"],
             st["optimizer_bytes"], st["teacher_cache_bytes"])  # fmt: skip
    return " / ".join(fmt(v / MiB, ".0f") for v in parts)


MODE_COLUMNS = [("mode", "mode"), ("peak MiB", _per("peak_bytes", MiB), ".0f"),
                ("peak / full", "peak_vs_full", ".2f"), ("state MiB", _per("state_bytes", MiB), ".0f"),
                ("params+teacher / grads / optim / cache MiB", _state_split),
                ("fine-tune ms", _per("finetune_median_s", 1e-3), ".0f"),
                ("SCRUB ms", _per("scrub_median_s", 1e-3), ".0f"),
                ("teacher fwd / lookup ms", lambda r: 1000 * r["segments_s"]["scrub"]["teacher"], ".0f"),
                ("SCRUB extra loss+bwd ms", lambda r: 1e3 * (r["extra_s"]["loss"] + r["extra_s"]["backward"]),
                 "+.0f"), ("step_ratio", "step_ratio", ".3f"), ("paired ratio", "step_ratio_paired", ".3f"),
                ("ratio from parts", "step_ratio_from_parts", ".3f")]  # fmt: skip
DATA_COLUMNS = [("N rows", "rows"), ("workers", "workers"),
                ("s / epoch (slower worker)", "seconds_per_epoch_data", ".2f"),
                ("peak MiB / worker", _per("peak_bytes_per_worker", MiB), ".1f"),
                ("file-backed pages MiB", _per("file_pages_bytes", MiB), ".1f"),
                ("peak - file pages MiB", _per("peak_minus_file_pages_bytes", MiB), ".1f"),
                ("store MiB", _per("store_bytes", MiB), ".1f")]  # fmt: skip


def render(result: dict) -> str:
    rows, data, goals, s = result["rows"], result["data"], result["goals"], result["settings"]
    full = next((r["peak_bytes"] for r in rows if r["mode"] == "full"), None)
    lines = []
    if rows:
        table = [{**r, "peak_vs_full": full and r["peak_bytes"] / full} for r in rows]
        lines += kit.table(table, MODE_COLUMNS)
        lines += ["", f"peak: {rows[0]['peak_kind']}, above the process's RSS before the model was built",
                  "step_ratio: median SCRUB step / median fine-tuning step; paired: median of per-pair "
                  "ratios; from parts: 1 + the SCRUB step's extra teacher + loss + backward time (median "
                  "per-pair differences) / fine-tune median"]  # fmt: skip
    if data:
        lines += ["", *kit.table(data, DATA_COLUMNS)]
    lines += [
        "",
        "Goals:",
        *(f"- {k}: {g['text']} -> {'met' if g['met'] else 'MISSED'}" for k, g in goals.items()),
    ]
    title = (f"scale: SmolLM2-135M shape (random weights, float32), batch {s['batch_rows']} x {s['seq_len']} "
             f"tokens, AdamW, 1 thread, {s['repeats']} timed pairs after {s['warmup']} warm-up "
             "pairs")  # fmt: skip
    return kit.document(title, result["header"], lines)


def _goal(value: float, limit: float, what: str) -> dict:
    return {"value": value, "limit": limit, "met": value <= limit, "text": f"{what} {value:.3f} <= {limit}"}


def evaluate_goals(rows: list[dict], data: list[dict]) -> dict:
    by, goals = {r["mode"]: r for r in rows}, {}
    if "teacher_cache" in by:
        ratio = by["teacher_cache"]["step_ratio"]
        goals["teacher_cache_step_ratio"] = _goal(ratio, GOAL_CACHE_RATIO, "teacher_cache step_ratio")
    if "lora" in by and "full" in by:
        share = by["lora"]["peak_bytes"] / by["full"]["peak_bytes"]
        goals["lora_peak_share"] = _goal(share, GOAL_LORA_PEAK, "lora peak / full peak")
    if len(data) >= 2:
        lo, hi = data[0], data[-1]
        growth = hi["peak_bytes_per_worker"] - lo["peak_bytes_per_worker"]
        pages = hi["file_pages_bytes"] - lo["file_pages_bytes"]
        beyond = growth - pages
        goals["data_worker_memory_flat"] = {
            "peak_growth_bytes": growth, "file_pages_growth_bytes": pages,
            "growth_beyond_file_pages_bytes": beyond, "tolerance_bytes": DATA_TOLERANCE,
            "met": beyond <= DATA_TOLERANCE,
            "text": f"per-worker peak N={hi['rows']} vs N={lo['rows']}: {growth / MiB:+.1f} MiB, of which "
            f"resident file-backed pages (the store's) {pages / MiB:+.1f} MiB; beyond them "
            f"{beyond / MiB:+.1f} MiB (tolerance {DATA_TOLERANCE / MiB:.0f} MiB)",
        }  # fmt: skip
    return goals


def parse_args(argv: list[str] | None = None):
    p = kit.parser(__doc__, "batch 2 x 32 tokens, 4 timed pairs, rows of 16-64 ids", out=False)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--no-data", action="store_true", help="skip part 2 (the data path)")
    p.add_argument("--no-model", action="store_true", help="skip part 1 (the modes)")
    p.add_argument("--batch-rows", type=int, help="rows per batch (default 4; 2 with --quick)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default 64; 32 with --quick)")
    p.add_argument("--warmup", type=int, help="discarded pairs (default 2; 1 with --quick)")
    p.add_argument("--repeats", type=int, help="timed pairs (default 8; 4 with --quick)")
    p.add_argument("--data-batch-size", type=int, default=32, help="global retain batch size (default 32)")
    p.add_argument("--seed", type=int, default=0)
    for internal in ("--_mode", "--_data-worker", "--_sync", "--_json"):  # a child: one mode or worker
        p.add_argument(internal, help=argparse.SUPPRESS)
    p.add_argument("--_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = kit.fill(p.parse_args(argv), dict(batch_rows=4, seq_len=64, warmup=2, repeats=8),
                    dict(batch_rows=2, seq_len=32, warmup=1, repeats=4))  # fmt: skip
    args.min_len, args.max_len = (16, 64) if args.quick else (32, 128)
    args.modes = kit.choose(p, args.modes, MODES, "modes")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args._mode is not None or args._data_worker is not None:  # a child: one mode, or one data worker
        if args._mode is not None:
            res = run_mode(args._mode, args.batch_rows, args.seq_len, args.warmup, args.repeats, args.seed)
        else:
            res = data_worker(args._data_worker, args._rank, args.data_batch_size, args.seed, args._sync)
        Path(args._json).write_text(json.dumps(res))
        return None
    t_start = time.perf_counter()
    rows, data = [], []
    with tempfile.TemporaryDirectory(prefix="scale_") as tmp:
        for mode in [] if args.no_model else args.modes:
            print(f"[scale] mode {mode} ...", flush=True)
            rows.append(r := run_mode_subprocess(mode, args, Path(tmp)))
            print(f"[scale]   peak {r['peak_bytes'] / MiB:.0f} MiB, state {r['state_bytes'] / MiB:.0f} MiB, "
                  f"step_ratio {r['step_ratio']:.3f} ({r['process_seconds']:.0f} s)", flush=True)  # fmt: skip
        for n in [] if args.no_data else DATA_ROWS:
            print(f"[scale] data N={n} ...", flush=True)
            data.append(d := run_data(n, args, Path(tmp)))
            print(f"[scale]   {d['seconds_per_epoch_data']:.2f} s/epoch, peak "
                  f"{d['peak_bytes_per_worker'] / MiB:.1f} MiB/worker", flush=True)  # fmt: skip
    settings = {
        "model": "LlamaForCausalLM, SmolLM2-135M shape, random weights (seed), float32",
        "model_config": SMOLLM2_135M,
        **{k: getattr(args, k) for k in ("batch_rows", "seq_len", "warmup", "repeats")},
        "optimizer": "AdamW lr 1e-5 over the trainable parameters",
        "scrub": "configs/tofu.yaml's SCRUB min-step: gamma 1 x CE + alpha 1 x KL (T 1)",
        "step": "engine.loop.train_step + backend.step (SingleProcessBackend, CPU)",
        "lora": "rank 16, alpha 32, all-linear",
        "teacher_cache": "computed once by the student before any step; see rows[].teacher_cache_api",
        "data_rows": list(DATA_ROWS), "data_workers": WORKERS, "data_batch_size": args.data_batch_size,
        "data_row_tokens": [args.min_len, args.max_len], "seed": args.seed,
    }  # fmt: skip
    result = {"rows": rows, "data": data, "goals": evaluate_goals(rows, data), "quick": args.quick,
              "settings": settings, "header": kit.run_header(argv),
              "seconds": time.perf_counter() - t_start}  # fmt: skip
    text = render(result)
    print(text)
    print(f"\n[scale] {result['seconds']:.0f} s in all")
    if args.out is not None:
        kit.write_results(args.out, result, text)
    return result


if __name__ == "__main__":
    kit.main(main)
