"""How much does one SCRUB step cost next to one plain fine-tuning step, and what costs the difference?

A SCRUB step (min-step on retain data or max-step on forget data) is a fine-tuning step plus one
forward pass of the frozen teacher. With the usual rule of thumb (backward = 2 forwards, optimizer
step free) that puts the floor of ``SCRUB step / fine-tuning step`` at about 4/3 = 1.33. This script
measures where the engine actually is, for the same model and the same batch, and splits every step
into its parts so the gap to (or below) 1.33 is accounted for.

Teacher outputs never change, so when batches are not augmented they can be computed once and reused
across epochs; the ``cached`` step kinds take the teacher logits from such a table (indexed by the
batch's rows) instead of running the teacher, to show what that saves.

Protocol: every step kind runs the engine's own pieces in the order ``engine/loop.py`` runs them
(teacher forward under ``torch.no_grad`` -> student forward -> ``method.loss`` / normaliser / penalty /
finiteness check -> ``SingleProcessBackend.step`` -> ``float(loss)``), each kind on its own copy of the
same initial model with its own optimizer. Kinds are interleaved round-robin (the order rotates every
round), after warm-up rounds, on one thread; medians are reported. The backward / optimizer split
inside ``backend.step`` is read from optimizer step pre/post hooks, so the step itself is not edited.
Data loading / transforms are not timed (they are the same for every kind: the batch is fixed).

    python benchmarks/step_cost.py                 # batch 64, 30 repeats
    python benchmarks/step_cost.py --quick         # batch 32, 10 repeats, same protocol
    python benchmarks/step_cost.py --out runs/step_cost
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.backends.single import SingleProcessBackend
from engine.data.vision import (
    ImageSet,
    ImageStream,
    ImageTransform,
    _decode,
    detect_columns,
    load_splits,
)
from engine.io import json_safe, write_text_atomic
from engine.methods.erm import Erm, ErmConfig
from engine.methods.scrub import Scrub, ScrubConfig
from engine.models.loading import classifier_logits
from engine.models.vision import build_vision_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/cifar10"  # relative to the repository root, as in the brief
CIFAR_MEAN = [0.4914, 0.4822, 0.4465]  # engine.config DataConfig defaults
CIFAR_STD = [0.2470, 0.2435, 0.2616]

SEGMENTS = ("teacher", "student_fwd", "loss", "backward", "opt_step", "readout")
SEGMENT_LABELS = {
    "teacher": "teacher forward (no_grad, eval) / cache lookup",
    "student_fwd": "student forward (train mode)",
    "loss": "method.loss + normaliser + penalty + finite check",
    "backward": "zero_grad + backward",
    "opt_step": "optimizer step",
    "readout": "float(loss)",
}

Forward = Callable[[torch.nn.Module, dict], torch.Tensor]


# ----------------------------------------------------------------------------- one step


class _StepClock:
    """Timestamps taken inside ``backend.step`` by optimizer hooks: the moment the optimizer step starts
    (= backward done) and ends. Hooks leave the step's code untouched."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.pre = 0.0
        self.post = 0.0
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, *_: object) -> None:
        self.pre = time.perf_counter()

    def _post(self, *_: object) -> None:
        self.post = time.perf_counter()


@dataclass
class StepKind:
    """One thing to time: a method + phase on its own student/optimizer, optionally with cached teacher logits."""

    name: str
    label: str
    method: Erm | Scrub
    phase: str
    backend: SingleProcessBackend
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    clock: _StepClock
    teacher_cache: torch.Tensor | None = None  # (rows in the stream, classes): precomputed teacher logits
    samples: dict[str, list[float]] = field(default_factory=dict)  # "total" and each segment, seconds


def loop_step(kind: StepKind, batch: dict, forward: Forward) -> dict[str, float]:
    """One step exactly as the body of ``engine.loop.run_loop``'s batch loop, with timestamps between
    the pieces. Returns seconds per segment plus ``total``."""
    method, backend = kind.method, kind.backend
    t0 = time.perf_counter()
    # --- loop.py: teacher forward under no_grad (or, cached: the precomputed logits of these rows)
    teacher_logits = None
    if method.needs_teacher:
        if kind.teacher_cache is not None:
            teacher_logits = kind.teacher_cache[batch["rows"]]
        else:
            with torch.no_grad():
                teacher_logits = forward(kind.teacher, batch)
    t1 = time.perf_counter()
    # --- loop.py: student forward
    student_logits = forward(kind.student, batch)
    t2 = time.perf_counter()
    # --- loop.py: loss, normaliser (one micro-batch = the whole global batch here: share 1), penalty
    terms = method.loss(kind.phase, student_logits, teacher_logits, batch["labels"])
    loss = terms.total / max(terms.count, 1) * batch.get("share", 1.0)
    penalty = method.penalty(kind.student, kind.teacher)
    if penalty is not None:
        loss = loss + penalty
    t3 = time.perf_counter()
    # --- loop.py: backend.backward, the loss read back (finiteness check), backend.step (optimizer step +
    # zero_grad; the optimizer step itself is split out by the optimizer hooks)
    backend.backward(loss)
    if not math.isfinite(float(loss.detach())):
        raise RuntimeError(f"{kind.name}: non-finite loss; the benchmark's learning rate is too high")
    backend.step()
    t5 = time.perf_counter()
    return {
        "teacher": t1 - t0,
        "student_fwd": t2 - t1,
        "loss": t3 - t2,
        "backward": kind.clock.pre - t3,
        "opt_step": kind.clock.post - kind.clock.pre,
        "readout": t5 - kind.clock.post,  # the tail of backend.step after the hook (zero_grad)
        "total": t5 - t0,
    }


# ----------------------------------------------------------------------------- setup


def load_batch(data: str, batch_size: int, num_labels: int, seed: int) -> tuple[ImageStream, dict, str]:
    """A stream over ``batch_size`` real training images of the first ``num_labels`` classes (labels
    remapped to 0..num_labels-1 as ``data.classes`` does) and its one batch, through the engine's
    ``load_splits`` + ``ImageTransform`` + ``ImageStream``. Random images when the folder is absent."""
    path = Path(data) if Path(data).is_absolute() else (REPO / data).resolve()
    transform = ImageTransform(CIFAR_MEAN, CIFAR_STD, None)
    if path.exists():
        ds = load_splits(str(path), ["train"])["train"]
        image_col, label_col = detect_columns(ds, None, None)
        labels = np.asarray(ds[label_col])
        rows = np.flatnonzero(labels < num_labels)
        rows = np.random.default_rng(seed).choice(rows, size=batch_size, replace=False)
        rows.sort()
        images = _decode(ds, rows, image_col, None)
        ys = torch.as_tensor(labels[rows], dtype=torch.long)
        source = f"real CIFAR-10 train images ({path}), classes 0..{num_labels - 1}"
    else:
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (batch_size, 3, 32, 32), generator=g, dtype=torch.uint8)
        ys = torch.randint(0, num_labels, (batch_size,), generator=g)
        rows = np.arange(batch_size)
        source = f"RANDOM tensors: data folder {path} not found"
    stream = ImageStream(ImageSet(images, ys, rows.tolist()), transform, augment=False)
    batch = stream.get(torch.arange(len(stream)))  # unaugmented: what the cached teacher needs
    return stream, batch, source


def build_kinds(args: argparse.Namespace, batch: dict, stream_len: int) -> list[StepKind]:
    torch.manual_seed(args.seed)
    original = build_vision_model(args.arch, num_labels=args.num_labels, width=args.width)
    scrub_cfg = ScrubConfig(optimizer=args.optimizer)
    erm_cfg = ErmConfig(
        optimizer=scrub_cfg.optimizer,
        lr=scrub_cfg.lr,
        momentum=scrub_cfg.momentum,
        weight_decay=scrub_cfg.weight_decay,
        augment=False,
    )
    specs = [
        ("finetune", "fine-tune step (Erm)", Erm(erm_cfg), "min", False),
        ("scrub_min", "SCRUB min-step", Scrub(scrub_cfg), "min", False),
        ("scrub_max", "SCRUB max-step", Scrub(scrub_cfg), "max", False),
        ("scrub_min_cached", "SCRUB min-step, cached teacher", Scrub(scrub_cfg), "min", True),
        ("scrub_max_cached", "SCRUB max-step, cached teacher", Scrub(scrub_cfg), "max", True),
    ]
    kinds = []
    for name, label, method, phase, cached in specs:
        backend = SingleProcessBackend(device="cpu", num_threads=args.threads)
        teacher = copy.deepcopy(original) if method.needs_teacher else None
        student, teacher = backend.prepare(copy.deepcopy(original), teacher, method.config.build_optimizer)
        backend.set_lr(method.config.lr_at(1))
        student.train()  # the loop sets train mode per phase; both SCRUB phases train the student
        cache = None
        if cached:
            # Computed once, as an epoch-0 pass over an unaugmented stream would; never timed.
            cache = torch.zeros(stream_len, args.num_labels)
            with torch.no_grad():
                cache[batch["rows"]] = classifier_logits(teacher, batch)
        kinds.append(
            StepKind(
                name, label, method, phase, backend, student, teacher, _StepClock(backend.optimizer), cache
            )
        )
    return kinds


# ----------------------------------------------------------------------------- measuring


def measure(kinds: list[StepKind], batch: dict, warmup: int, repeats: int) -> None:
    """Round-robin over the kinds, the starting kind rotating each round; warm-up rounds are discarded."""
    n = len(kinds)
    for r in range(warmup + repeats):
        order = kinds[r % n :] + kinds[: r % n]
        for kind in order:
            times = loop_step(kind, batch, classifier_logits)
            if r >= warmup:
                for key, value in times.items():
                    kind.samples.setdefault(key, []).append(value)


def _ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values)


def summarise(kinds: list[StepKind]) -> dict:
    out: dict = {"steps": {}, "segments": {}}
    for k in kinds:
        total = k.samples["total"]
        q = np.quantile(np.asarray(total) * 1000.0, [0.25, 0.75])
        out["steps"][k.name] = {
            "label": k.label,
            "median_ms": _ms(total),
            "p25_ms": float(q[0]),
            "p75_ms": float(q[1]),
            "min_ms": 1000.0 * min(total),
            "n": len(total),
        }
        out["segments"][k.name] = {s: _ms(k.samples[s]) for s in SEGMENTS}
    base = out["steps"]["finetune"]["median_ms"]
    out["ratios"] = {k.name: out["steps"][k.name]["median_ms"] / base for k in kinds if k.name != "finetune"}
    # Paired: each round times every kind once, so a round's ratio cancels slow drifts in machine load.
    ft = next(k for k in kinds if k.name == "finetune").samples
    out["paired_ratios"] = {
        k.name: statistics.median(a / b for a, b in zip(k.samples["total"], ft["total"], strict=True))
        for k in kinds
        if k.name != "finetune"
    }
    seg = out["segments"]
    # The 4/3 rule of thumb re-derived from this model: the extra cost is one more forward, priced as
    # the student's forward (what 1.33 assumes) or as the teacher's (eval mode, no autograd graph).
    out["model"] = {
        "floor_rule_of_thumb": 4.0 / 3.0,
        "floor_if_teacher_costs_a_student_forward": 1.0 + seg["finetune"]["student_fwd"] / base,
        "floor_with_measured_teacher_forward": 1.0 + seg["scrub_min"]["teacher"] / base,
        "teacher_fwd_over_student_fwd": seg["scrub_min"]["teacher"] / seg["scrub_min"]["student_fwd"],
        "backward_over_student_fwd": seg["finetune"]["backward"] / seg["finetune"]["student_fwd"],
        "opt_step_share_of_finetune": seg["finetune"]["opt_step"] / base,
    }
    # What the SCRUB steps pay beyond fine-tuning, part by part (ms, median of the per-round differences).
    out["extra_vs_finetune_ms"] = {
        k.name: {
            part: 1000.0 * statistics.median(a - b for a, b in zip(k.samples[part], ft[part], strict=True))
            for part in (*SEGMENTS, "total")
        }
        for k in kinds
        if k.name != "finetune"
    }
    return out


# ----------------------------------------------------------------------------- reporting


def render(summary: dict, settings: dict) -> str:
    steps, seg, model = summary["steps"], summary["segments"], summary["model"]
    ratios, paired = summary["ratios"], summary["paired_ratios"]
    names = list(steps)
    lines = [
        f"# SCRUB step cost vs fine-tuning: {settings['arch']} width {settings['width']}, "
        f"batch {settings['batch_size']}, {settings['threads']} thread(s), {settings['optimizer']}, "
        f"{settings['repeats']} repeats after {settings['warmup']} warm-up rounds",
        f"data: {settings['data_source']}",
        "",
        "| step | median ms | p25-p75 ms | / fine-tune (ratio of medians) | / fine-tune (median per-round ratio) |",
        "|---|---:|---:|---:|---:|",
    ]
    for n in names:
        s = steps[n]
        ratio, pair = ("1.000", "1.000") if n == "finetune" else (f"{ratios[n]:.3f}", f"{paired[n]:.3f}")
        lines.append(
            f"| {s['label']} | {s['median_ms']:.2f} | {s['p25_ms']:.2f}-{s['p75_ms']:.2f} | {ratio} | {pair} |"
        )
    lines += [
        "",
        "Median ms of each part of the step (the parts' medians need not add up to the step's median):",
        "",
        "| part | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for part in SEGMENTS:
        lines.append(f"| {SEGMENT_LABELS[part]} | " + " | ".join(f"{seg[n][part]:.2f}" for n in names) + " |")
    base = steps["finetune"]["median_ms"]
    lines += [
        "",
        f"floor, rule of thumb (1 extra forward, backward = 2 forwards, free optimizer): "
        f"{model['floor_rule_of_thumb']:.3f}",
        f"floor, this model (1 extra forward priced as the student's train-mode forward): "
        f"{model['floor_if_teacher_costs_a_student_forward']:.3f}",
        f"floor, this model (1 extra forward priced as the measured teacher forward): "
        f"{model['floor_with_measured_teacher_forward']:.3f}",
        f"teacher forward / student forward: {model['teacher_fwd_over_student_fwd']:.2f}; "
        f"backward / student forward: {model['backward_over_student_fwd']:.2f}; "
        f"optimizer step share of a fine-tune step: {model['opt_step_share_of_finetune']:.1%}",
        "",
        "What a step pays beyond a fine-tune step, by part: median of the per-round differences, ms "
        "(in units of the fine-tune step's median):",
        "",
        "| step | " + " | ".join(SEGMENTS) + " | whole step |",
        "|---|" + "---:|" * (len(SEGMENTS) + 1),
    ]
    for n, extra in summary["extra_vs_finetune_ms"].items():
        cells = [f"{extra[p]:+.2f} ({extra[p] / base:+.3f})" for p in (*SEGMENTS, "total")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--arch", default="preact_resnet18", help="engine vision arch (default preact_resnet18)")
    p.add_argument("--width", type=float, default=0.25, help="width multiplier (default 0.25)")
    p.add_argument("--num-labels", type=int, default=5, help="classes (default 5: CIFAR-10 classes 0..4)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 64; 32 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 30; 10 with --quick)")
    p.add_argument(
        "--warmup", type=int, default=None, help="discarded rounds first (default 5; 3 with --quick)"
    )
    p.add_argument("--quick", action="store_true", help="10 repeats, batch 32, 3 warm-up rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--optimizer", choices=["sgd", "adam"], default="sgd", help="shared by all kinds (default sgd)"
    )
    p.add_argument(
        "--data", default=DEFAULT_DATA, help=f"CIFAR-10 folder (default {DEFAULT_DATA}, from the repo root)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write DIR/results.json and DIR/results.md")
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 32 if args.quick else 64
    if args.repeats is None:
        args.repeats = 10 if args.quick else 30
    if args.warmup is None:
        args.warmup = 3 if args.quick else 5
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:  # already set in this process (main() called twice)
        pass
    stream, batch, source = load_batch(args.data, args.batch_size, args.num_labels, args.seed)
    kinds = build_kinds(args, batch, len(stream))
    measure(kinds, batch, args.warmup, args.repeats)
    summary = summarise(kinds)
    settings = {
        "arch": args.arch,
        "width": args.width,
        "num_labels": args.num_labels,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "optimizer": args.optimizer,
        "data_source": source,
        "seed": args.seed,
    }
    table = render(summary, settings)
    print(table)
    result = {
        "question": "time of a SCRUB min/max step vs a plain fine-tuning step, same model and batch",
        "settings": settings,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": {
            "processor": platform.processor(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        **summary,
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        # Atomic and NaN-safe, through the same writer as the engine's reports.
        write_text_atomic(
            args.out / "results.json", json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n"
        )
        write_text_atomic(args.out / "results.md", table + "\n")
    return result


if __name__ == "__main__":
    main()
