"""What the step-timing benchmarks share (step_cost.py, scale.py, gpu_scrub_throughput.py,
gpu_lora_memory.py): the engine's own step, ``engine.loop.train_step`` + ``backend.step()``, timed part by
part through train_step's ``clock`` hook; a stream of token rows; the GPU benchmarks' Llama; peak memory
(GPU, and the kernel's resident high-water mark); a time budget."""

from __future__ import annotations

import datetime as _dt
import platform
import threading
import time
from contextlib import contextmanager, nullcontext

from benchmarks.kit import command

PARTS = ("teacher", "student_fwd", "loss", "backward", "opt_step", "other")  # timed_step's, in seconds
LLAMA_SHAPE = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")


class Clock:
    """Seconds per part of a step: ``clock(part)`` is the context manager ``engine.loop.train_step`` times
    its "teacher", "student" (recorded as "student_fwd"), "loss" and "backward" parts with, and the script
    its own (``backend.step()`` as "opt_step"). ``sync`` (a GPU's ``torch.cuda.synchronize``) runs at each
    edge, so a part's time is its kernels' (a cached teacher's lookup is its "teacher" part)."""

    def __init__(self, sync=None):
        self.sync, self.times = sync, {}

    @contextmanager
    def __call__(self, part: str):
        if self.sync:
            self.sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            name = "student_fwd" if part == "student" else part
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t

    def take(self) -> dict[str, float]:
        """The parts' seconds since the last take."""
        times, self.times = self.times, {}
        return times


def timed_step(method, backend, student, teacher, phase, batch, forward, clock: Clock, cache=None) -> dict:
    """One optimizer step as `unlearn run` takes it: ``engine.loop.train_step`` on one micro-batch that is
    the whole global batch (share 1), then ``backend.step()``. Returns the seconds of each part (``PARTS``;
    "other": the rest of the step, such as the loss read back), ``total`` and the loss (``value``)."""
    from engine.loop import train_step

    clock.take()
    t0 = time.perf_counter()
    loss = train_step(method, backend, student, teacher, phase, [{**batch, "share": 1.0}], forward,
                      teacher_outputs=cache, clock=clock)  # fmt: skip
    with clock("opt_step"):
        backend.step()
    if clock.sync:
        clock.sync()
    total = time.perf_counter() - t0
    parts = clock.take()
    return {**parts, "other": total - sum(parts.values()), "total": total, "value": loss}


class TokenRows:
    """A stream (the protocol of the loop and engine/teacher_cache.py) over rows of token ids, every token
    an answer token: ``get(rows)`` pads them with the engine's ``collate`` and says which rows they are."""

    def __init__(self, ids: list[list[int]]):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, rows, seed: int = 0) -> dict:
        from engine.data.text import collate

        examples = [{"input_ids": self.ids[int(i)], "labels": self.ids[int(i)]} for i in rows]
        return {**collate(examples, pad_id=0), "rows": rows}


def storage_bytes(tensors) -> int:
    """Bytes of the storages under ``tensors``, each storage counted once."""
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def llama(args, device, dtype, attn: str, checkpointing: bool, on_device: bool = True):
    """A Llama of ``args``' shape (``LLAMA_SHAPE``, untied embeddings), random weights (seed ``args.seed``)
    in ``dtype``, built directly on ``device`` (no CPU copy) unless ``on_device`` is False, with the engine's
    gradient checkpointing (used in train mode only: a frozen teacher runs as usual)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.models.causal_lm import enable_gradient_checkpointing

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq_len),
                      tie_word_embeddings=False, use_cache=False)  # fmt: skip
    torch.manual_seed(args.seed)
    with torch.device(device) if on_device else nullcontext():
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation=attn)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model


def reset_peak(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(cuda: bool) -> int:
    """The GPU's ``max_memory_allocated`` since ``reset_peak``; on CPU the host's peak RSS so far."""
    import resource

    import torch

    if cuda:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def gpu_header(cuda: bool, question: str, **libraries) -> dict:
    """What a GPU benchmark's results.json starts with: its question, the device, versions, date, command."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    device = f"cuda: {torch.cuda.get_device_name()}" if cuda else f"cpu: {cpu}"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {"question": question, "device": device, "torch": torch.__version__,
            "transformers": transformers.__version__, **libraries, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "date": date, "command": command()}  # fmt: skip


def budgeted(
    names, max_seconds: float, run_one, results: dict, key: str, save, wall0: float, ahead=True, stop=False
) -> tuple[dict, bool]:
    """``results[key] = {name: run_one(name)}`` in order, with ``results["wall_seconds"]`` (since ``wall0``,
    the script's start), then ``save()`` (which returns the Markdown) after each; the last one printed.
    Returns the rows and whether every name ran. A name is skipped once ``max_seconds`` (0: no limit) have
    passed since ``wall0``, or with ``ahead`` would pass within the last run's time; an out-of-memory run is
    recorded as an error (``stop``: no name runs after it)."""
    import torch

    rows, ok, last, md = {}, True, 0.0, ""
    for name in names:
        elapsed, t = time.perf_counter() - wall0, time.perf_counter()
        if max_seconds and elapsed + (last if ahead else 0.0) > max_seconds:
            rows[name], ok = {"skipped": f"time budget: {elapsed:.0f} s of {max_seconds:.0f} s used"}, False
        else:
            try:
                rows[name] = run_one(name)
            except torch.OutOfMemoryError as exc:  # keep what ran
                rows[name], ok = {"error": f"out of memory: {str(exc).splitlines()[0][:300]}"}, False
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            last = time.perf_counter() - t
        if "skipped" in rows[name] or "error" in rows[name]:
            print(f"{name}: {rows[name].get('skipped') or rows[name]['error']}", flush=True)
        results[key], results["wall_seconds"] = rows, time.perf_counter() - wall0
        md = save()
        if stop and "error" in rows[name]:
            break
    print(md, flush=True)
    return rows, ok


# --- resident memory (scale.py, zero_scaling.py) ----------------------------------------------------------


def proc_status(*keys: str, pid: int | str = "self") -> dict[str, int]:
    """Fields of /proc/PID/status (VmRSS, VmHWM, RssFile, ...) in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024
    return out


def rss() -> int:
    return proc_status("VmRSS")["VmRSS"]


class PeakMeter:
    """The peak resident memory from ``start()`` on: the kernel's VmHWM after resetting it (clear_refs 5),
    or, where that file cannot be written, the largest VmRSS a 1 ms sampling thread saw."""

    def __init__(self) -> None:
        self.kind, self._max = "", 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import gc

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
            return proc_status("VmHWM")["VmHWM"]
        self._stop.set()
        self._thread.join()
        return max(self._max, rss())
