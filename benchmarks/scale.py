"""Does a SmolLM2-sized SCRUB run fit and keep its pace: memory and step time of the four ways to hold the
teacher, and the data path's per-worker memory as the retain set grows?

Part 1, the model (``rows``). One causal LM with SmolLM2-135M's shape (``LlamaConfig``: hidden 576,
intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings: 134.5M parameters, 538 MB
in float32; random weights, seed 0, also at ``--quick``, so the weights dominate the process), one fixed
batch of random token ids (labels = the next tokens, through ``engine.data.text.collate``), the loop's LM
forward ``engine.models.causal_lm.token_logits``, AdamW (lr 1e-5) over the trainable parameters. Four modes,
each in its own fresh subprocess so the peaks never mix:

- ``full``: the teacher is a second full copy (deepcopy, eval, frozen), run under ``no_grad`` every SCRUB
  step;
- ``teacher_cache``: the teacher's outputs for the batch computed once before the timed steps, by the student
  before its first step (it equals the teacher then), through ``engine.teacher_cache.fill_teacher_cache`` and
  looked up every SCRUB step with ``TeacherCache.lookup`` (full logits: they fit the default budget); no
  teacher model exists in the process;
- ``lora``: the student is ``engine.models.lora.apply_lora`` (rank 16, alpha 32, all-linear), the teacher is
  ``AdapterDisabled(student)`` (the same base weights, adapters off), run every SCRUB step;
- ``lora+teacher_cache``: both.

In each mode SCRUB min-steps (``Scrub.loss("min", ...)``: gamma x CE + alpha x KL, over the counted tokens)
and plain fine-tuning steps (CE only, ``cross_entropy_sum / n``) alternate on the same student and optimizer,
in pairs (which kind goes first alternates); warm-up pairs are discarded; ``step_ratio`` is the SCRUB step's
median time over the fine-tuning step's median (also recorded: the median of the per-pair ratios, and the
ratio from the parts that differ, less exposed to a busy machine's noise). A step is zero_grad -> (teacher
forward / cache lookup) -> student forward -> loss -> backward -> optimizer step -> ``float(loss)``, each
part timed.

``peak_bytes``: the kernel's resident high-water mark (``VmHWM`` of /proc/self/status, reset through
/proc/self/clear_refs just before the first step) minus the resident memory (``VmRSS``) before the model was
built: exact, where a sampling thread could miss a short peak; a sampling thread (1 ms) is the fallback
where clear_refs cannot be written. ``state_bytes``: parameters + gradients + optimizer state, counted from
the tensors (``engine.backends.memory.StateMeter`` at the optimizer step, as the engine reports it), plus
the frozen teacher's parameters (``full``) or the cached logits (cache modes).

Part 2, the data path (``data``). For N = 10^3, 10^4, 10^5 synthetic retain rows (random lengths 32-128
token ids; ``--quick``: 16-64), a token store (``engine.data.store.write_token_store``); then W = 2 worker
processes each open ``TokenStore(folder, pad_id=0)`` and read only their share of one epoch, the way
``engine.backends.base.Backend.batches`` shards it: ``epoch_order(N, seed, epoch, "retain")``, global
batches ``order.split(batch_size)``, this rank's ``rows.tensor_split(W)[rank]``, ``store.get(share)``. The
workers start reading together (a barrier file). ``seconds_per_epoch_data``: the slower worker's epoch;
``peak_bytes_per_worker``: the larger worker's resident high-water mark above its resident memory after
imports. The store's pages a worker touched are resident in it (file-backed, shared, evictable page cache),
so they are reported next to the peak (``file_pages_bytes``: growth of ``RssFile`` over the epoch: the store's
pages plus library code run for the first time, a constant) and the check compares the peak's growth from
N = 10^3 to 10^5 with that growth.

Writes ``DIR/results.json`` (``{"rows": [{"mode", "peak_bytes", "state_bytes", "step_ratio", ...}], "data":
[{"rows", "workers", "seconds_per_epoch_data", "peak_bytes_per_worker", ...}], "goals": ..., ...}``) and
``DIR/results.md``.

    python benchmarks/scale.py --out runs/scale            # batch 4 x 64 tokens, 8 timed pairs per mode
    python benchmarks/scale.py --out /tmp/scale --quick    # batch 2 x 32 tokens, 4 timed pairs; same model
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
import threading
import time
from pathlib import Path

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.scale
    from _common import REPO, fmt, header_markdown, md_table, run_header, write_json, write_text
except ImportError:  # pragma: no cover
    from benchmarks._common import REPO, fmt, header_markdown, md_table, run_header, write_json, write_text

sys.path.insert(0, str(REPO))

SEGMENTS = (
    "teacher",
    "student_fwd",
    "loss",
    "backward",
    "opt_step",
)  # parts of a step (zero_grad in teacher)
MODES = ("full", "teacher_cache", "lora", "lora+teacher_cache")
DATA_ROWS = (1_000, 10_000, 100_000)
WORKERS = 2
# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M), the fields that set the shape
SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
}
GOAL_CACHE_RATIO = 1.05  # teacher_cache: SCRUB step / fine-tuning step
GOAL_LORA_PEAK = 0.6  # lora peak / full peak
DATA_TOLERANCE = 8 * 2**20  # per-worker peak growth 1e3 -> 1e5 beyond the store's resident pages
MiB = 2**20


# ----------------------------------------------------------------------------- resident memory


def _status_kib(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024
    return out


def rss() -> int:
    return _status_kib("VmRSS")["VmRSS"]


class PeakMeter:
    """The peak resident memory from ``start()`` on: the kernel's VmHWM after resetting it (clear_refs 5),
    or, where that file cannot be written, the largest VmRSS a 1 ms sampling thread saw."""

    def __init__(self) -> None:
        self.kind = ""
        self._max = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "VmHWM after clear_refs reset (kernel high-water mark)"
        except OSError:
            self.kind = "VmRSS sampled every 1 ms (clear_refs not writable)"
            self._max = rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, rss())

    def peak(self) -> int:
        if self._thread is None:
            return _status_kib("VmHWM")["VmHWM"]
        self._stop.set()
        self._thread.join()
        return max(self._max, rss())


# ----------------------------------------------------------------------------- part 1: one mode


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class _FixedStream:
    """The loop's stream protocol (``len``, ``get(rows, seed)``) over a few encoded examples, batched by
    ``engine.data.text.collate`` as a text stream or token store does."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def get(self, rows, seed: int = 0) -> dict:
        from engine.data.text import collate

        batch = collate([self.examples[int(r)] for r in rows], pad_id=0)
        batch["rows"] = rows
        return batch


def run_mode(mode: str, batch_rows: int, seq_len: int, warmup: int, repeats: int, seed: int) -> dict:
    """One mode in this (fresh) process: build, time interleaved fine-tune / SCRUB steps, measure memory."""
    import peft  # noqa: F401  (imported before the baseline in every mode: library code is not the model's)
    import torch
    import transformers

    from engine.backends.memory import StateMeter
    from engine.config import load_config
    from engine.methods.losses import cross_entropy_sum
    from engine.methods.scrub import Scrub
    from engine.models.causal_lm import token_logits
    from engine.models.lora import AdapterDisabled, LoraSettings, apply_lora

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    vocab = SMOLLM2_135M["vocab_size"]
    ids = torch.randint(0, vocab, (batch_rows, seq_len)).tolist()
    examples = [{"input_ids": r, "labels": list(r)} for r in ids]  # labels = next tokens (collate shifts)
    batch = _FixedStream(examples).get(torch.arange(batch_rows))
    n_tokens = int(batch["labels"].shape[0])
    # the causal-LM recipe's SCRUB settings (configs/tofu.yaml: T = gamma = alpha = 1), not the vision defaults
    scrub = Scrub(load_config("configs/tofu.yaml").method)
    lora, cached = mode.startswith("lora"), mode.endswith("teacher_cache")

    gc.collect()
    baseline = rss()  # before the model exists
    t_build = time.perf_counter()
    config = transformers.LlamaConfig(**SMOLLM2_135M)
    model = transformers.LlamaForCausalLM(config).float()
    teacher = cache = None
    if lora:
        student = apply_lora(model, LoraSettings(rank=16, alpha=32, target_modules="all-linear"))
        if not cached:
            teacher = AdapterDisabled(student)
    else:
        student = model
        if not cached:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
    cache_api = None
    if cached:
        # The teacher's outputs, computed once before any step by the student (equal to the teacher then), as
        # method.teacher_cache=auto does: engine.teacher_cache's fill, then a lookup every step
        from engine.backends.single import SingleProcessBackend
        from engine.teacher_cache import fill_teacher_cache

        c = scrub.config
        cache = fill_teacher_cache(
            student,
            {"retain": _FixedStream(examples)},
            token_logits,
            SingleProcessBackend(device="cpu", num_threads=1),
            batch_size=batch_rows,
            temperature=c.temperature,
            topk=c.teacher_cache_topk,
            budget_bytes=c.teacher_cache_bytes,
            progress=False,
        )
        cache_api = "engine.teacher_cache.TeacherCache.lookup"
    student.train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    meter = StateMeter(student, optimizer, partitioned=False)  # counts at every optimizer step (post-hook)
    build_seconds = time.perf_counter() - t_build

    def teacher_logits():
        if cache is not None:
            return cache.lookup("retain", batch)
        with torch.no_grad():
            return token_logits(teacher, batch)

    def step(kind: str) -> dict[str, float]:
        """One step; seconds of each part (``SEGMENTS``) and ``total``."""
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        target = teacher_logits() if kind == "scrub" else None
        t1 = time.perf_counter()
        logits = token_logits(student, batch)
        t2 = time.perf_counter()
        if kind == "scrub":
            terms = scrub.loss("min", logits, target, batch["labels"])
            loss = terms.total / max(terms.count, 1)
        else:
            loss = cross_entropy_sum(logits, batch["labels"]) / n_tokens
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        optimizer.step()
        value = float(loss.detach())
        t5 = time.perf_counter()
        if value != value:
            raise RuntimeError(f"{mode}: non-finite loss")
        return dict(zip(("teacher", "student_fwd", "loss", "backward", "opt_step", "total"),
                        (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)))  # fmt: skip

    peak = PeakMeter()
    peak.start()
    samples: dict[str, list[dict[str, float]]] = {"finetune": [], "scrub": []}
    for r in range(warmup + repeats):
        first_second = ("finetune", "scrub") if r % 2 == 0 else ("scrub", "finetune")  # alternates per pair
        for kind in first_second:
            t = step(kind)
            if r >= warmup:
                samples[kind].append(t)
    times = {kind: [t["total"] for t in ts] for kind, ts in samples.items()}
    peak_rss = peak.peak()

    state = dict(meter.max)
    teacher_bytes = _storage_bytes(teacher.parameters()) if teacher is not None and not lora else 0
    if cache is None:
        cache_bytes = 0
    elif torch.is_tensor(cache):
        cache_bytes = int(cache.numel() * cache.element_size())
    else:
        cache_bytes = sum(st.nbytes for st in cache.streams.values())
    ft, sc = statistics.median(times["finetune"]), statistics.median(times["scrub"])
    extra = {
        p: statistics.median(s[p] - f[p] for s, f in zip(samples["scrub"], samples["finetune"]))
        for p in (*SEGMENTS, "total")
    }
    return {
        "mode": mode,
        "peak_bytes": peak_rss - baseline,
        "state_bytes": sum(state.values()) + teacher_bytes + cache_bytes,
        "step_ratio": sc / ft,
        "step_ratio_paired": statistics.median(s / f for s, f in zip(times["scrub"], times["finetune"])),
        "finetune_median_s": ft,
        "scrub_median_s": sc,
        "finetune_s": times["finetune"],
        "scrub_s": times["scrub"],
        # median seconds of each part; the SCRUB step's extra over the fine-tuning step, part by part
        # (median of the per-pair differences): what a busy machine's noise on the whole step hides
        "segments_s": {
            k: {p: statistics.median(t[p] for t in ts) for p in SEGMENTS} for k, ts in samples.items()
        },
        "extra_s": extra,
        # the ratio from the parts that differ (teacher forward or lookup, loss, backward): the student
        # forward and the optimizer step do the same work in both kinds, so their differences are noise only
        "step_ratio_from_parts": 1.0 + (extra["teacher"] + extra["loss"] + extra["backward"]) / ft,
        "state": {**state, "teacher_parameter_bytes": teacher_bytes, "teacher_cache_bytes": cache_bytes},
        "parameters": sum(p.numel() for p in student.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak_rss,
        "peak_kind": peak.kind,
        "teacher_cache_api": cache_api,
        "build_seconds": build_seconds,
        "batch": {"rows": batch_rows, "tokens_per_row": seq_len, "counted_tokens": n_tokens},
        "warmup_pairs": warmup,
        "timed_pairs": repeats,
    }


# ----------------------------------------------------------------------------- part 2: the data path


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


def data_worker(
    folder: str, rank: int, workers: int, batch_size: int, seed: int, epoch: int, sync: str
) -> dict:
    """One rank's epoch of data reading (Backend.batches' sharding), after a barrier with the other ranks."""
    import torch

    from engine.backends.sampling import epoch_order
    from engine.data.store import TokenStore

    torch.set_num_threads(1)
    gc.collect()
    before = _status_kib("VmRSS", "RssFile")
    peak = PeakMeter()
    peak.start()
    Path(sync, f"ready.{rank}").touch()
    while not Path(sync, "go").exists():
        time.sleep(0.005)
    t0 = time.perf_counter()
    store = TokenStore(folder, pad_id=0)
    order = epoch_order(len(store), seed, epoch, "retain")
    steps = tokens = rows_read = 0
    for rows in order.split(batch_size):
        share = rows.tensor_split(workers)[rank]
        if len(share):
            batch = store.get(share)
            tokens += int(batch["attention_mask"].sum())
            rows_read += len(share)
        steps += 1
    seconds = time.perf_counter() - t0
    peak_rss = peak.peak()
    after = _status_kib("VmRSS", "RssFile")
    return {
        "rank": rank,
        "seconds": seconds,
        "peak_bytes": peak_rss - before["VmRSS"],
        "file_pages_bytes": after["RssFile"] - before["RssFile"],
        "rss_end_bytes": after["VmRSS"] - before["VmRSS"],
        "rows_read": rows_read,
        "tokens_read": tokens,
        "steps": steps,
        "peak_kind": peak.kind,
    }


def run_data(n: int, args: argparse.Namespace, root: Path) -> dict:
    folder, sync = root / f"store_{n}", root / f"sync_{n}"
    t0 = time.perf_counter()
    store_bytes = write_store(folder, n, args.min_len, args.max_len, args.seed)
    write_seconds = time.perf_counter() - t0
    sync.mkdir()
    procs = []
    for rank in range(WORKERS):
        out = sync / f"result.{rank}.json"
        cmd = [
            sys.executable,
            __file__,
            "--_data-worker",
            str(folder),
            "--_rank",
            str(rank),
            "--_json",
            str(out),
        ]
        cmd += [
            "--data-batch-size",
            str(args.data_batch_size),
            "--seed",
            str(args.seed),
            "--_sync",
            str(sync),
        ]
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
        results.append(json.loads(out.read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    worst = max(results, key=lambda r: r["peak_bytes"])
    return {
        "rows": n,
        "workers": WORKERS,
        "seconds_per_epoch_data": max(r["seconds"] for r in results),
        "peak_bytes_per_worker": worst["peak_bytes"],
        "file_pages_bytes": worst["file_pages_bytes"],
        "peak_minus_file_pages_bytes": worst["peak_bytes"] - worst["file_pages_bytes"],
        "store_bytes": store_bytes,
        "store_write_seconds": write_seconds,
        "batch_size": args.data_batch_size,
        "row_tokens": [args.min_len, args.max_len],
        "per_worker": results,
    }


# ----------------------------------------------------------------------------- driver


def _child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def run_mode_subprocess(mode: str, args: argparse.Namespace, folder: Path) -> dict:
    out = folder / f"mode_{mode.replace('+', '_')}.json"
    cmd = [sys.executable, __file__, "--_mode", mode, "--_json", str(out), "--seed", str(args.seed)]
    cmd += ["--batch-rows", str(args.batch_rows), "--seq-len", str(args.seq_len)]
    cmd += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=_child_env(), check=True)
    row = json.loads(out.read_text())
    row["process_seconds"] = time.perf_counter() - t0
    return row


def render(result: dict) -> str:
    rows, data, goals, s = result["rows"], result["data"], result["goals"], result["settings"]
    full = next((r for r in rows if r["mode"] == "full"), None)
    lines = [
        f"# scale: SmolLM2-135M shape (random weights, float32), "
        f"batch {s['batch_rows']} x {s['seq_len']} tokens, "
        f"AdamW, 1 thread, {s['repeats']} timed pairs after {s['warmup']} warm-up pairs",
        "",
        *header_markdown(result["header"]),
        "",
    ]
    if rows:
        table = []
        for r in rows:
            st = r["state"]
            table.append(
                [
                    r["mode"],
                    fmt(r["peak_bytes"] / MiB, ".0f"),
                    fmt(r["peak_bytes"] / full["peak_bytes"], ".2f") if full else "-",
                    fmt(r["state_bytes"] / MiB, ".0f"),
                    " / ".join(
                        fmt(v / MiB, ".0f")
                        for v in (
                            st["parameter_bytes"] + st["teacher_parameter_bytes"],
                            st["gradient_bytes"],
                            st["optimizer_bytes"],
                            st["teacher_cache_bytes"],
                        )
                    ),
                    fmt(r["finetune_median_s"] * 1000, ".0f"),
                    fmt(r["scrub_median_s"] * 1000, ".0f"),
                    fmt(r["segments_s"]["scrub"]["teacher"] * 1000, ".0f"),
                    fmt((r["extra_s"]["loss"] + r["extra_s"]["backward"]) * 1000, "+.0f"),
                    fmt(r["step_ratio"], ".3f"),
                    fmt(r["step_ratio_paired"], ".3f"),
                    fmt(r["step_ratio_from_parts"], ".3f"),
                ]
            )
        lines += md_table(
            [
                "mode",
                "peak MiB",
                "peak / full",
                "state MiB",
                "params+teacher / grads / optim / cache MiB",
                "fine-tune ms",
                "SCRUB ms",
                "teacher fwd / lookup ms",
                "SCRUB extra loss+bwd ms",
                "step_ratio",
                "paired ratio",
                "ratio from parts",
            ],
            table,
        )
        lines.append("")
        lines.append(f"peak: {rows[0]['peak_kind']}, above the process's RSS before the model was built")
        lines.append(
            "step_ratio: median SCRUB step / median fine-tuning step; paired: median of per-pair ratios; "
            "from parts: 1 + the SCRUB step's extra teacher + loss + backward time (median per-pair "
            "differences) / fine-tune median"
        )
    if data:
        lines += [""] + md_table(
            [
                "N rows",
                "workers",
                "s / epoch (slower worker)",
                "peak MiB / worker",
                "file-backed pages MiB",
                "peak - file pages MiB",
                "store MiB",
            ],
            [
                [
                    d["rows"],
                    d["workers"],
                    fmt(d["seconds_per_epoch_data"], ".2f"),
                    fmt(d["peak_bytes_per_worker"] / MiB, ".1f"),
                    fmt(d["file_pages_bytes"] / MiB, ".1f"),
                    fmt(d["peak_minus_file_pages_bytes"] / MiB, ".1f"),
                    fmt(d["store_bytes"] / MiB, ".1f"),
                ]
                for d in data
            ],
        )
    lines += ["", "Goals:"]
    for name, g in goals.items():
        lines.append(f"- {name}: {g['text']} -> {'met' if g['met'] else 'MISSED'}")
    return "\n".join(lines)


def evaluate_goals(rows: list[dict], data: list[dict]) -> dict:
    by = {r["mode"]: r for r in rows}
    goals = {}
    if "teacher_cache" in by:
        ratio = by["teacher_cache"]["step_ratio"]
        goals["teacher_cache_step_ratio"] = {
            "value": ratio,
            "limit": GOAL_CACHE_RATIO,
            "met": ratio <= GOAL_CACHE_RATIO,
            "text": f"teacher_cache step_ratio {ratio:.3f} <= {GOAL_CACHE_RATIO}",
        }
    if "lora" in by and "full" in by:
        share = by["lora"]["peak_bytes"] / by["full"]["peak_bytes"]
        goals["lora_peak_share"] = {
            "value": share,
            "limit": GOAL_LORA_PEAK,
            "met": share <= GOAL_LORA_PEAK,
            "text": f"lora peak / full peak {share:.3f} <= {GOAL_LORA_PEAK}",
        }
    if len(data) >= 2:
        lo, hi = data[0], data[-1]
        growth = hi["peak_bytes_per_worker"] - lo["peak_bytes_per_worker"]
        pages = hi["file_pages_bytes"] - lo["file_pages_bytes"]
        beyond = growth - pages
        goals["data_worker_memory_flat"] = {
            "peak_growth_bytes": growth,
            "file_pages_growth_bytes": pages,
            "growth_beyond_file_pages_bytes": beyond,
            "tolerance_bytes": DATA_TOLERANCE,
            "met": beyond <= DATA_TOLERANCE,
            "text": f"per-worker peak N={hi['rows']} vs N={lo['rows']}: {growth / MiB:+.1f} MiB, of which "
            f"resident file-backed pages (the store's) {pages / MiB:+.1f} MiB; "
            f"beyond them {beyond / MiB:+.1f} MiB "
            f"(tolerance {DATA_TOLERANCE / MiB:.0f} MiB)",
        }
    return goals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--out", type=Path, default=None, help="write DIR/results.json and DIR/results.md")
    p.add_argument(
        "--quick", action="store_true", help="batch 2 x 32 tokens, 4 timed pairs, rows of 16-64 ids"
    )
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--no-data", action="store_true", help="skip part 2 (the data path)")
    p.add_argument("--no-model", action="store_true", help="skip part 1 (the modes)")
    p.add_argument("--batch-rows", type=int, default=None, help="rows per batch (default 4; 2 with --quick)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 64; 32 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="discarded pairs (default 2; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed pairs (default 8; 4 with --quick)")
    p.add_argument("--data-batch-size", type=int, default=32, help="global retain batch size (default 32)")
    p.add_argument("--seed", type=int, default=0)
    # internal: a child process running one mode or one data worker
    p.add_argument("--_mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_data-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_sync", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = {"batch_rows": (4, 2), "seq_len": (64, 32), "warmup": (2, 1), "repeats": (8, 4)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.min_len, args.max_len = (16, 64) if args.quick else (32, 128)
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args._mode is not None:  # child: one mode
        row = run_mode(args._mode, args.batch_rows, args.seq_len, args.warmup, args.repeats, args.seed)
        Path(args._json).write_text(json.dumps(row))
        return None
    if args._data_worker is not None:  # child: one data worker
        res = data_worker(
            args._data_worker, args._rank, WORKERS, args.data_batch_size, args.seed, 0, args._sync
        )
        Path(args._json).write_text(json.dumps(res))
        return None

    import torch

    torch.set_num_threads(1)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    t_start = time.perf_counter()
    rows, data = [], []
    with tempfile.TemporaryDirectory(prefix="scale_") as tmp:
        root = Path(tmp)
        if not args.no_model:
            for mode in modes:
                print(f"[scale] mode {mode} ...", flush=True)
                rows.append(run_mode_subprocess(mode, args, root))
                r = rows[-1]
                print(
                    f"[scale]   peak {r['peak_bytes'] / MiB:.0f} MiB, "
                    f"state {r['state_bytes'] / MiB:.0f} MiB, "
                    f"step_ratio {r['step_ratio']:.3f} ({r['process_seconds']:.0f} s)",
                    flush=True,
                )
        if not args.no_data:
            for n in DATA_ROWS:
                print(f"[scale] data N={n} ...", flush=True)
                data.append(run_data(n, args, root))
                d = data[-1]
                print(
                    f"[scale]   {d['seconds_per_epoch_data']:.2f} s/epoch, peak "
                    f"{d['peak_bytes_per_worker'] / MiB:.1f} MiB/worker",
                    flush=True,
                )
    result = {
        "rows": rows,
        "data": data,
        "goals": evaluate_goals(rows, data),
        "quick": args.quick,
        "settings": {
            "model": "LlamaForCausalLM, SmolLM2-135M shape, random weights (seed), float32",
            "model_config": SMOLLM2_135M,
            "batch_rows": args.batch_rows,
            "seq_len": args.seq_len,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "optimizer": "AdamW lr 1e-5 over the trainable parameters",
            "scrub": "Scrub(ScrubConfig()) min-step: gamma 0.99 x CE + alpha 0.001 x KL (T 4)",
            "lora": "rank 16, alpha 32, all-linear",
            "teacher_cache": "computed once by the student before any step; see rows[].teacher_cache_api",
            "data_rows": list(DATA_ROWS),
            "data_workers": WORKERS,
            "data_batch_size": args.data_batch_size,
            "data_row_tokens": [args.min_len, args.max_len],
            "seed": args.seed,
        },
        "header": run_header(argv),
        "seconds": time.perf_counter() - t_start,
    }
    text = render(result)
    print(text)
    print(f"\n[scale] {result['seconds']:.0f} s in all")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "results.json", result)
        write_text(args.out / "results.md", text + "\n")
    return result


if __name__ == "__main__":
    main()
