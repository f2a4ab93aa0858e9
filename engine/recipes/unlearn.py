"""`unlearn run`: unlearn a checkpoint (SCRUB, SCRUB+R, or another registered method).

Reads top to bottom: check inputs -> load data and models -> evaluate the original (epoch 0) ->
the method's optional ``prepare`` (re-initialise, freeze, perturb: engine.methods.base) -> the backend
builds the optimizer over the parameters left trainable -> the one loop, evaluating (and, for SCRUB+R,
snapshotting) after each epoch -> final scores with the membership attacks -> SCRUB+R selection ->
export checkpoints, report and model card atomically.

``loop_seconds`` / ``train_seconds`` in report.json include ``prepare_seconds`` (all of Fisher
forgetting's cost, Retrain's re-initialisation), so every method's reported time is its whole cost.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.backends import build_backend
from engine.checkpoint.export import (
    check_output_dir,
    image_processor,
    model_card,
    save_checkpoint,
    staged_dir,
)
from engine.checkpoint.receipt import now, write_receipt
from engine.checkpoint.resume import RunCheckpoints, check_resumable
from engine.config import RunConfig, dump_config
from engine.data.vision import ImageStream, PairedImageStream
from engine.errors import ConfigError
from engine.eval.report import write_report
from engine.methods import build_method
from engine.methods.base import MethodContext
from engine.methods.blocks import last_blocks
from engine.methods.scrub import select_rewind_epoch
from engine.models.loading import classifier_logits, load_classifier
from engine.recipes.common import (
    Evaluator,
    cpu_state,
    describe,
    load_data_and_transform,
    require_single,
    seed_everything,
)
from engine.tracking import Tracker

REPORTED = ("forget_error", "retain_error", "test_error", "val_error", "mia", "mia_efficacy")


def run_unlearning(cfg: RunConfig, log=print) -> Path:
    t_start = time.perf_counter()
    started_at = now()
    if cfg.model.path is None:
        raise ConfigError(
            "`unlearn run` needs model.path: the checkpoint to unlearn (e.g. runs/cifar5-train/original)"
        )
    check_output_dir(cfg.output_dir, cfg.overwrite)  # refuse before any work
    partial_dir = Path(cfg.output_dir).with_name(Path(cfg.output_dir).name + ".partial")
    resume = check_resumable(partial_dir, cfg)  # another run's checkpoint is refused, also before any work
    seed_everything(cfg.seed)
    require_single(cfg, "`unlearn run` of image classifiers (task=vision)")
    backend = build_backend(cfg.backend)
    data, image, transform = load_data_and_transform(cfg, cfg.model.path)
    log(
        f"forget set: {data.description}: {len(data.forget)} examples; retain {len(data.retain)}, "
        f"val {len(data.val)}, test {len(data.test)}"
    )
    student = load_classifier(
        cfg.model.path, data.num_labels, cfg.model.revision, cfg.model.trust_remote_code
    )
    reference = load_classifier(cfg.eval.reference, data.num_labels) if cfg.eval.reference else None
    method = build_method(cfg.method)
    if (
        getattr(cfg.method, "k", None) is not None
    ):  # CF-k / EU-k: a k beyond the model is refused before any work
        last_blocks(student, cfg.method.k)
    teacher = (
        copy.deepcopy(student) if method.needs_teacher or getattr(cfg.method, "param_distance", 0) else None
    )
    augment = getattr(cfg.method, "augment", False)
    streams = {
        "forget": ImageStream(data.forget, transform, augment=augment),
        "retain": ImageStream(data.retain, transform, augment=augment),
    }
    if any(p.stream == "paired" for e in range(1, cfg.method.epochs + 1) for p in method.phases(e)):
        streams["paired"] = PairedImageStream(streams["forget"], streams["retain"])

    with staged_dir(cfg.output_dir, cfg.overwrite, resume=resume) as stage:
        dump_config(cfg, stage / "config.yaml")
        tracker = Tracker(
            cfg.logging, stage, name=Path(cfg.output_dir).name, config=cfg.model_dump(mode="json")
        )
        evaluator = Evaluator(data, transform, cfg, backend.device, tracker)
        student.to(backend.device)  # evaluated before `prepare` may change it; backend.prepare keeps it there
        original = None  # a resumed run has the original's scores in its checkpoint
        if not resume:
            original = evaluator(student, attacks=True)
            evaluator.record(0, student, None, {}, metrics=original)
            log(f"original: {describe(original)}")
        rewind = bool(getattr(cfg.method, "rewind", False))
        snapshots = stage / "epochs"
        if rewind and not resume:  # a resumed run keeps the snapshots it made before
            snapshots.mkdir()
            save_file(cpu_state(student), snapshots / "epoch_0.safetensors")

        t_prepare = time.perf_counter()
        if hasattr(method, "prepare"):  # before backend.prepare: what it freezes stays out of the optimizer
            method.prepare(student, _method_context(data, transform, backend))
        student, teacher = backend.prepare(student, teacher, cfg.method.build_optimizer)
        prepare_seconds = time.perf_counter() - t_prepare
        losses: dict[str, list[float]] = {}
        ckpt = RunCheckpoints(
            stage, cfg, backend, student, student, streams, log=log,
            client_state=lambda: {"history": evaluator.history, "losses": losses, "original": original},
        )  # fmt: skip
        client = ckpt.restore() if resume else None
        if client is not None:
            evaluator.history, losses, original = client["history"], client["losses"], client["original"]

        def on_step(epoch: int, phase: str, step: int, value: float) -> None:
            losses.setdefault(phase, []).append(value)

        def on_epoch_end(epoch: int, epoch_losses: dict[str, float]) -> None:
            row = (
                evaluator.record(epoch, student, cfg.method.lr_at(epoch), epoch_losses)
                if cfg.eval.every_epoch
                else {}
            )
            if rewind:
                save_file(cpu_state(student), snapshots / f"epoch_{epoch}.safetensors")
            ckpt.end_of_epoch(epoch)
            log(f"epoch {epoch}: losses {epoch_losses} {describe(row)}")

        t_loop = time.perf_counter()
        ckpt.run(method, teacher, streams, classifier_logits, epochs=cfg.method.epochs, on_step=on_step,
                 on_epoch_end=on_epoch_end)  # fmt: skip
        loop_seconds = time.perf_counter() - t_loop + prepare_seconds
        first = ckpt.start["epoch"] if ckpt.start else 1  # evaluations before a resume were not in this loop
        train_seconds = evaluator.training_seconds(loop_seconds, since=first)
        final = evaluator(student, attacks=True)
        log(f"{cfg.method.name}: {describe(final)}")
        ref_metrics = evaluator(reference.to(backend.device), attacks=True) if reference is not None else None

        settings = cfg.method.model_dump(mode="json")
        record = {"forget": data.forget_summary(), "method": settings, "base_model": cfg.model.path}
        title = f"{cfg.method.name.upper()} unlearning: {data.description}"
        card_metrics = {k: final[k] for k in REPORTED}
        save_checkpoint(
            student,
            stage / "model",
            image_processor(image),
            model_card(title, cfg.model.path, data.forget_summary(), settings, card_metrics),
            {**record, "metrics": final},
        )
        artifacts = {"model": "model", "config": "config.yaml"}

        rewound = None
        if rewind:
            # SCRUB+R: target = the final model's error on the forget-validation set; pick the saved
            # epoch (0 = original) whose forget error is closest (ties: earliest).
            if not cfg.eval.every_epoch:
                raise ConfigError("SCRUB+R (method.rewind=true) needs eval.every_epoch=true")
            errors = [row["forget_error"] for row in evaluator.history]
            target = final["forget_val_error"]
            j = select_rewind_epoch(errors, target)
            chosen = copy.deepcopy(student)
            chosen.load_state_dict(load_file(snapshots / f"epoch_{j}.safetensors"))
            rewound_metrics = evaluator(chosen, attacks=True)
            rewound = {
                "epoch": j,
                "target_error": target,
                "forget_errors": errors,
                "metrics": rewound_metrics,
            }
            rsettings = {**settings, "rewound_to_epoch": j}
            save_checkpoint(
                chosen,
                stage / "model_rewound",
                image_processor(image),
                model_card(
                    f"SCRUB+R (epoch {j}): {data.description}",
                    cfg.model.path,
                    data.forget_summary(),
                    rsettings,
                    {k: rewound_metrics[k] for k in REPORTED},
                ),
                {**record, "method": rsettings, "metrics": rewound_metrics},
            )
            artifacts["model_rewound"] = "model_rewound"
            log(f"SCRUB+R: target forget error {target:.2f} -> epoch {j}: {describe(rewound_metrics)}")
            for f in snapshots.iterdir():  # the chosen one is exported; the rest are scratch
                f.unlink()
            snapshots.rmdir()

        tracker.finish()
        ckpt.remove()  # the run is complete: the exported model is the result
        write_receipt(
            stage, forget=data.forget_summary(), input_model=cfg.model.path, revision=cfg.model.revision,
            outputs={k: v for k, v in artifacts.items() if k.startswith("model")}, method=settings,
            metrics=final, started_at=started_at,
        )  # fmt: skip
        write_report(
            stage,
            {
                "title": title,
                "command": "run",
                "method": settings,
                "forget": data.forget_summary(),
                "metrics": final,
                "original": original,
                "reference": ref_metrics,
                "rewound": rewound,
                "history": evaluator.history,
                "losses": losses,
                "seconds": time.perf_counter() - t_start,
                "loop_seconds": loop_seconds,
                "prepare_seconds": prepare_seconds,
                "train_seconds": train_seconds,
                "resumed_from_epoch": first - 1 if ckpt.start else None,
                "resume": ckpt.report(),
                "artifacts": artifacts,
            },
        )
    out = Path(cfg.output_dir)
    log(f"done: model in {out / 'model'}, report in {out / 'report.md'}")
    return out


def _method_context(data, transform, backend) -> MethodContext:
    retain = ImageStream(data.retain, transform, augment=False)

    def retain_batches(batch_size: int):
        for rows in torch.arange(len(retain)).split(batch_size):
            yield retain.get(rows)

    return MethodContext(
        forward=classifier_logits,
        retain_batches=retain_batches,
        freeze=backend.prepare_frozen,
        device=backend.device,
        forget_classes=list(data.forget_classes) if data.forget_kind == "class" else None,
    )
