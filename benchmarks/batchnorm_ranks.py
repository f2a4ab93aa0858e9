"""How far does the demo's ResNet (BatchNorm) on 2 DeepSpeed ranks land from the single process?

    python -m benchmarks.batchnorm_ranks --out DIR [--quick]

`configs/demo.yaml` as a user runs it: `unlearn train --only original` of the PreAct-ResNet18, then SCRUB
(`unlearn run`) from it on one process and on 2 ranks (torchrun, gloo on CPU, ZeRO-2). A net without
BatchNorm gives the same weights on 2 ranks within float32 rounding (tests/integration/test_matrix.py); a
BatchNorm net cannot: in train mode each rank normalises its half of every batch by that half's own
statistics, and keeps its own running statistics, of which rank 0's are exported (DDP keeps them so too;
`backend.sync_batchnorm=true` on GPUs uses the global batch's). Reports the largest and median difference of
the weights and of the running statistics against how far the run moved them, and the errors of both models.
Writes DIR/results.json and DIR/results.md. ``--quick``: 3 classes of a tiny real CIFAR-10, width 0.125 (about
1 minute on 2 cores); default: the same at width 0.25.
"""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks import kit
from engine.testing import free_port, make_tiny_cifar, tiny_overrides

METRICS = ("forget_error", "retain_error", "test_error", "mia")
DIFF_COLUMNS = [("tensors", "tensors"), ("max abs diff", "max", ".3g"),
                ("median of per-tensor max", "median", ".3g"), ("largest at", lambda d: f"`{d['where']}`"),
                ("max move by the run", "moved_by_the_run", ".3g")]  # fmt: skip
MODEL_COLUMNS = [("model", "model"), *((k, k, ".1f") for k in METRICS)]


def unlearn(args: list[str], ranks: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "engine.cli"]
    if ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                  "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                  "-m", "engine.cli"]  # fmt: skip
    proc = subprocess.run([*launch, *args], cwd=kit.REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(
            f"{' '.join(args[:2])} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )


def differences(a: dict, b: dict, base: dict, running: bool) -> dict:
    keys = [k for k in a if ("running_" in k) == running and "num_batches_tracked" not in k]
    diff = sorted(float((a[k].float() - b[k].float()).abs().max()) for k in keys)
    worst = max(keys, key=lambda k: float((a[k].float() - b[k].float()).abs().max()))
    moved = max(float((a[k].float() - base[k].float()).abs().max()) for k in keys)
    return {"max": diff[-1], "median": diff[len(diff) // 2], "where": worst, "moved_by_the_run": moved}


def render(result: dict) -> str:
    diffs = [
        {"tensors": kind.replace("_", " "), **result[kind]} for kind in ("weights", "running_statistics")
    ]
    models = [{"model": n, **m} for n, m in result["metrics"].items()]
    lines = [*kit.table(diffs, DIFF_COLUMNS), "", *kit.table(models, MODEL_COLUMNS)]
    return kit.document("BatchNorm on 2 DeepSpeed ranks against one process", result, lines)


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file

    args = kit.parser(__doc__, "width 0.125 (about 1 minute)").parse_args(argv)
    header = kit.run_header(argv)
    work = args.out / "work"
    cifar = work / "cifar"
    if not cifar.exists():
        make_tiny_cifar(cifar)
    width = {"model.width": "0.125" if args.quick else "0.25"}
    train = work / "train"
    if not (train / "original").exists():
        unlearn(["train", "configs/demo.yaml", *tiny_overrides(cifar, work, output_dir=str(train), **width),
                 "--only", "original"], 1)  # fmt: skip
    runs = {}
    for name, ranks, extra in (
        ("single", 1, {}),
        ("2 ranks", 2, {"backend.name": "deepspeed", "backend.zero_stage": "2"}),
    ):
        out = work / name.replace(" ", "_")
        unlearn(["run", "configs/demo.yaml", *tiny_overrides(cifar, work, **{
            "output_dir": str(out), "model.path": str(train / "original"), "eval.reference": "null",
            "overwrite": "true", **width, **extra})], ranks)  # fmt: skip
        runs[name] = out
    a, b = (load_file(runs[n] / "model" / "model.safetensors") for n in ("single", "2 ranks"))
    base = load_file(train / "original" / "model.safetensors")
    metrics = {n: kit.read_json(runs[n] / "report.json")["metrics"] for n in runs}
    result = {**header, "quick": args.quick, "weights": differences(a, b, base, running=False),
              "running_statistics": differences(a, b, base, running=True),
              "metrics": {n: {k: metrics[n][k] for k in METRICS} for n in runs}}  # fmt: skip
    print(kit.write_results(args.out, result, render(result)))
    return 0


if __name__ == "__main__":
    kit.main(main)
