"""How much does one SCRUB step cost next to one plain fine-tuning step, and what costs the difference?

A SCRUB step (min-step on retain data or max-step on forget data) is a fine-tuning step plus one forward pass
of the frozen teacher: with the usual rule of thumb (backward = 2 forwards, optimizer step free) the floor of
``SCRUB step / fine-tuning step`` is about 4/3 = 1.33. This script measures where the engine is, for the same
model and batch, and splits every step into its parts so the gap to (or below) 1.33 is accounted for. The
``cached`` kinds look the teacher's outputs up in the engine's teacher cache (``fill_teacher_cache``, as
``method.teacher_cache=auto`` fills it when batches are not augmented) instead of running the teacher.

Protocol: every step is the engine's own (``engine.loop.train_step`` + ``SingleProcessBackend.step``, its
parts timed through train_step's ``clock`` hook), each kind on its own copy of the same model and optimizer,
interleaved round-robin after warm-up rounds on one thread; medians are reported. benchmarks/README.md
("step_cost.py") gives the protocol whole, the figures and their reading.

    python -m benchmarks.step_cost          # batch 64, 30 repeats
    python -m benchmarks.step_cost --quick  # batch 32, 10 repeats, same protocol
    python -m benchmarks.step_cost --out runs/step_cost
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks import kit, timing
from engine.backends.single import SingleProcessBackend
from engine.data.vision import ImageSet, ImageStream, ImageTransform, _decode, detect_columns, load_splits
from engine.methods import Erm, ErmConfig, Scrub, ScrubConfig
from engine.methods.base import Phase
from engine.models.loading import classifier_logits
from engine.models.vision import build_vision_model
from engine.teacher_cache import fill_teacher_cache

CIFAR_MEAN = [0.4914, 0.4822, 0.4465]  # engine.config DataConfig defaults
CIFAR_STD = [0.2470, 0.2435, 0.2616]
SEGMENTS = timing.PARTS  # the parts of a step, as train_step's clock hook times them
SEGMENT_LABELS = {
    "teacher": "teacher forward (no_grad, eval) / cache lookup",
    "student_fwd": "student forward (train mode)",
    "loss": "method.loss + share + penalty",
    "backward": "backend.backward",
    "opt_step": "backend.step (optimizer step + zero_grad)",
    "other": "the rest (loss read back, bookkeeping)",
}


@dataclass
class StepKind:
    """One thing to time: a method + phase on its own student/optimizer, maybe with cached teacher outputs."""

    name: str
    label: str
    method: Erm | Scrub
    phase: Phase
    backend: SingleProcessBackend
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    cache: object | None = None  # engine.teacher_cache.TeacherCache
    samples: dict[str, list[float]] = field(default_factory=dict)  # "total" and each segment, seconds


def load_batch(data: str, batch_size: int, num_labels: int, seed: int) -> tuple[ImageStream, dict, str]:
    """A stream over ``batch_size`` real training images of the first ``num_labels`` classes (labels
    remapped to 0..num_labels-1 as ``data.classes`` does) and its one batch, through the engine's
    ``load_splits`` + ``ImageTransform`` + ``ImageStream``. Random images when the folder is absent."""
    path = Path(data).resolve()
    if path.exists():
        ds = load_splits(str(path), ["train"])["train"]
        image_col, label_col = detect_columns(ds, None, None)
        labels = np.asarray(ds[label_col])
        rows = np.random.default_rng(seed).choice(
            np.flatnonzero(labels < num_labels), size=batch_size, replace=False
        )
        rows.sort()
        images, ys = _decode(ds, rows, image_col, None), torch.as_tensor(labels[rows], dtype=torch.long)
        source = f"real CIFAR-10 train images ({path}), classes 0..{num_labels - 1}"
    else:
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (batch_size, 3, 32, 32), generator=g, dtype=torch.uint8)
        ys, rows = torch.randint(0, num_labels, (batch_size,), generator=g), np.arange(batch_size)
        source = f"RANDOM tensors: data folder {path} not found"
    stream = ImageStream(
        ImageSet(images, ys, rows.tolist()), ImageTransform(CIFAR_MEAN, CIFAR_STD, None), augment=False
    )
    return stream, stream.get(torch.arange(len(stream))), source  # unaugmented: what the cached teacher needs


def build_kinds(args, stream: ImageStream) -> list[StepKind]:
    torch.manual_seed(args.seed)
    original = build_vision_model(args.arch, num_labels=args.num_labels, width=args.width)
    scrub_cfg = ScrubConfig(optimizer=args.optimizer)
    erm_cfg = ErmConfig(optimizer=scrub_cfg.optimizer, lr=scrub_cfg.lr, momentum=scrub_cfg.momentum,
                        weight_decay=scrub_cfg.weight_decay, augment=False)  # fmt: skip
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
        if cached:  # computed once, as before a run's first step; never timed
            c = method.config
            cache = fill_teacher_cache(teacher, {"retain": stream}, classifier_logits, backend,
                                       batch_size=len(stream), temperature=c.temperature,
                                       topk=c.teacher_cache_topk, budget_bytes=c.teacher_cache_bytes,
                                       progress=False)  # fmt: skip
        # every kind steps on the same fixed batch: the phase names the loss, the stream the batch's rows
        step = Phase(phase, "retain", len(stream))
        kinds.append(StepKind(name, label, method, step, backend, student, teacher, cache))
    return kinds


def measure(kinds: list[StepKind], batch: dict, warmup: int, repeats: int) -> None:
    """Round-robin over the kinds, the starting kind rotating each round; warm-up rounds are discarded."""
    clock, n = timing.Clock(), len(kinds)
    for r in range(warmup + repeats):
        for k in kinds[r % n :] + kinds[: r % n]:
            times = timing.timed_step(k.method, k.backend, k.student, k.teacher, k.phase, batch,
                                      classifier_logits, clock, k.cache)  # fmt: skip
            if not math.isfinite(times["value"]):
                raise RuntimeError(f"{k.name}: non-finite loss; the benchmark's learning rate is too high")
            if r >= warmup:
                for key in (*SEGMENTS, "total"):
                    k.samples.setdefault(key, []).append(times.get(key, 0.0))


def _ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values)


def summarise(kinds: list[StepKind]) -> dict:
    out: dict = {"steps": {}, "segments": {}}
    for k in kinds:
        total = k.samples["total"]
        q = np.quantile(np.asarray(total) * 1000.0, [0.25, 0.75])
        out["steps"][k.name] = {"label": k.label, "median_ms": _ms(total), "p25_ms": float(q[0]),
                                "p75_ms": float(q[1]), "min_ms": 1000.0 * min(total),
                                "n": len(total)}  # fmt: skip
        out["segments"][k.name] = {s: _ms(k.samples[s]) for s in SEGMENTS}
    base = out["steps"]["finetune"]["median_ms"]
    others = [k for k in kinds if k.name != "finetune"]
    out["ratios"] = {k.name: out["steps"][k.name]["median_ms"] / base for k in others}
    # Paired: each round times every kind once, so a round's ratio cancels slow drifts in machine load.
    ft = next(k for k in kinds if k.name == "finetune").samples
    out["paired_ratios"] = {k.name: statistics.median(a / b for a, b in zip(k.samples["total"], ft["total"]))
                            for k in others}  # fmt: skip
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
        k.name: {p: _ms([a - b for a, b in zip(k.samples[p], ft[p])]) for p in (*SEGMENTS, "total")}
        for k in others
    }  # fmt: skip
    return out


def render(summary: dict, settings: dict) -> str:
    steps, seg, model = summary["steps"], summary["segments"], summary["model"]
    ratios, paired = {"finetune": 1.0, **summary["ratios"]}, {"finetune": 1.0, **summary["paired_ratios"]}
    base = steps["finetune"]["median_ms"]
    lines = [f"# SCRUB step cost vs fine-tuning: {settings['arch']} width {settings['width']}, "
             f"batch {settings['batch_size']}, {settings['threads']} thread(s), {settings['optimizer']}, "
             f"{settings['repeats']} repeats after {settings['warmup']} warm-up rounds",
             f"data: {settings['data_source']}", ""]  # fmt: skip
    lines += kit.table([{**s, "ratio": ratios[n], "paired": paired[n]} for n, s in steps.items()],
                       [("step", "label"), ("median ms", "median_ms", ".2f"),
                        ("p25-p75 ms", lambda s: f"{s['p25_ms']:.2f}-{s['p75_ms']:.2f}"),
                        ("/ fine-tune (ratio of medians)", "ratio", ".3f"),
                        ("/ fine-tune (median per-round ratio)", "paired", ".3f")], right=1)  # fmt: skip
    lines += ["", "Median ms of each part of the step (the parts' medians need not add up to the step's "
              "median):", ""]  # fmt: skip
    parts = [{"part": SEGMENT_LABELS[p], **{n: seg[n][p] for n in steps}} for p in SEGMENTS]
    lines += kit.table(parts, [("part", "part"), *((n, n, ".2f") for n in steps)], right=1)
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
    ]

    def extra(part: str):
        return lambda e: f"{e[part]:+.2f} ({e[part] / base:+.3f})"

    rows = [{"step": n, **e} for n, e in summary["extra_vs_finetune_ms"].items()]
    columns = [("step", "step"), *((p, extra(p)) for p in SEGMENTS), ("whole step", extra("total"))]
    return "\n".join(lines + kit.table(rows, columns, right=1))


def parse_args(argv: list[str] | None = None):
    p = kit.parser(__doc__, "10 repeats, batch 32, 3 warm-up rounds", out=False)
    p.add_argument("--arch", default="preact_resnet18", help="engine vision arch (default preact_resnet18)")
    p.add_argument("--width", type=float, default=0.25, help="width multiplier (default 0.25)")
    p.add_argument("--num-labels", type=int, default=5, help="classes (default 5: CIFAR-10 classes 0..4)")
    p.add_argument("--batch-size", type=int, help="batch size (default 64; 32 with --quick)")
    p.add_argument("--repeats", type=int, help="timed rounds (default 30; 10 with --quick)")
    p.add_argument("--warmup", type=int, help="discarded rounds first (default 5; 3 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--optimizer", choices=["sgd", "adam"], default="sgd", help="shared by all kinds (default sgd)"
    )
    p.add_argument("--data", default=str(kit.CIFAR), help=f"CIFAR-10 folder (default {kit.CIFAR})")
    p.add_argument("--seed", type=int, default=0)
    full, quick = dict(batch_size=64, repeats=30, warmup=5), dict(batch_size=32, repeats=10, warmup=3)
    return kit.fill(p.parse_args(argv), full, quick)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:  # already set in this process (main() called twice)
        pass
    stream, batch, source = load_batch(args.data, args.batch_size, args.num_labels, args.seed)
    kinds = build_kinds(args, stream)
    measure(kinds, batch, args.warmup, args.repeats)
    summary = summarise(kinds)
    keys = ("arch", "width", "num_labels", "batch_size", "repeats", "warmup", "quick", "optimizer", "seed")
    settings = {k: getattr(args, k) for k in keys}
    settings.update(
        threads=torch.get_num_threads(), data_source=source, step="engine.loop.train_step + backend.step"
    )
    table = render(summary, settings)
    print(table)
    result = {"question": "time of a SCRUB min/max step vs a plain fine-tuning step, same model and batch",
              "settings": settings, **kit.run_header(argv), **summary}  # fmt: skip
    if args.out is not None:
        kit.write_results(args.out, result, table)
    return result


if __name__ == "__main__":
    kit.main(main)
