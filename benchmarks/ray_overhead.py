"""What does Ray add to a run? Seconds from `unlearn run` to the first optimizer step, and per
`ray.train.report`.

    python -m benchmarks.ray_overhead --out DIR [--quick] [--repeats N]

The same tiny job (a 2-layer Llama on real TOFU rows, 10 authors, SCRUB for 2 epochs) is started as a user
starts it, ``python -m engine.cli run configs/tofu.yaml ...``, on three backends: the single process, an
embedded local Ray with 1 Ray Train worker and with 2 (DeepSpeed ZeRO-2 inside them). For each start it
records the seconds from launching the command to the end of the first optimizer step (``first_step_at`` in
report.json, the clock of this machine) and the seconds each worker's ``ray.train.report`` of an epoch's
checkpoint took (``ray_report_seconds`` in the history). A warm-up run first fills the model's evaluation
cache and DeepSpeed's compiled op, so every measured start finds the same caches. Starts are interleaved round
by round; medians are reported. Writes DIR/results.json (``rows``: ``seconds_to_first_step``,
``ray_overhead_s``, ``report_seconds``, ... per backend) and DIR/results.md. ``--quick``: one round (about 3
minutes on 2 cores); default: 3 rounds.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import kit
from engine.testing import make_tiny_lm, ray_env, tofu_overrides

BACKENDS = {  # name -> (workers, overrides)
    "single": (1, {}),
    "ray, 1 worker": (1, {"backend.name": "ray", "backend.num_workers": "1", "backend.zero_stage": "2"}),
    "ray, 2 workers": (2, {"backend.name": "ray", "backend.num_workers": "2", "backend.zero_stage": "2"}),
}
COLUMNS = [("backend", "backend"), ("s to first step", "seconds_to_first_step", ".1f"),
           ("Ray overhead s", lambda r: "" if r["ray_overhead_s"] is None else f"{r['ray_overhead_s']:+.1f}"),
           ("s per ray.train.report", lambda r: "" if r["report_seconds"] is None
            else f"{r['report_seconds']:.2f} (max {r['report_seconds_max']:.2f})"),
           ("whole run s", "wall_seconds", ".0f")]  # fmt: skip
JOB = {"eval.reference": "null", "method.lr": "0.003", "method.forget_batch_size": "3", "method.epochs": "2"}


def start(lm: Path, out: Path, overrides: dict) -> dict:
    """One `unlearn run` as a user starts it; what its report says about time."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "engine.cli", "run", "configs/tofu.yaml",
           *tofu_overrides(lm, out.parent, output_dir=out, **JOB, **overrides)]  # fmt: skip
    launched = time.time()
    proc = subprocess.run(cmd, cwd=kit.REPO, env=ray_env(), capture_output=True, text=True, timeout=1800)
    wall = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    report = kit.read_json(out / "report.json")
    reports = [row["ray_report_seconds"] for row in report["history"] if "ray_report_seconds" in row]
    return {"seconds_to_first_step": report["first_step_at"] - launched, "wall_seconds": wall,
            "report_seconds": reports}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = kit.parser(__doc__, "one round (about 3 minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3, 1 with --quick)")
    args = parser.parse_args(argv)
    rounds = args.repeats or (1 if args.quick else 3)
    header = kit.run_header(argv)
    work = args.out / "work"
    lm = work / "tiny_lm"
    if not (lm / "model.safetensors").is_file():
        make_tiny_lm(lm)
    print("warm-up run (fills the evaluation cache and DeepSpeed's compiled op) ...", flush=True)
    start(lm, work / "warmup", BACKENDS["ray, 1 worker"][1])
    samples: dict[str, list[dict]] = {name: [] for name in BACKENDS}
    for r in range(rounds):
        for name, (_, overrides) in BACKENDS.items():
            folder = work / f"run_{len(samples[name])}_{name.replace(' ', '').replace(',', '_')}"
            s = start(lm, folder, overrides)
            samples[name].append(s)
            print(f"round {r + 1}/{rounds} {name}: first step {s['seconds_to_first_step']:.1f} s after "
                  f"launch, reports {[round(x, 2) for x in s['report_seconds']]} s, whole run "
                  f"{s['wall_seconds']:.0f} s", flush=True)  # fmt: skip
    single = statistics.median(s["seconds_to_first_step"] for s in samples["single"])
    rows = []
    for name, (workers, _) in BACKENDS.items():
        first = statistics.median(s["seconds_to_first_step"] for s in samples[name])
        reports = [x for s in samples[name] for x in s["report_seconds"]]
        rows.append({
            "backend": name, "workers": workers,
            "seconds_to_first_step": round(first, 2),
            "ray_overhead_s": round(first - single, 2) if name != "single" else None,
            "report_seconds": round(statistics.median(reports), 3) if reports else None,
            "report_seconds_max": round(max(reports), 3) if reports else None,
            "wall_seconds": round(statistics.median(s["wall_seconds"] for s in samples[name]), 1),
            "samples": samples[name],
        })  # fmt: skip
    lines = [f"Medians of {rounds} round(s).", "", *kit.table(rows, COLUMNS)]
    kit.write_results(args.out, {**header, "quick": args.quick, "rounds": rounds, "rows": rows},
                      kit.document("What Ray adds to a run", header, lines))  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    kit.main(main)
