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
from functools import partial
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
from engine.checkpoint.run_folder import RunFolder
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
    main_log,
    seed_everything,
)
from engine.tracking import Tracker

REPORTED = ("forget_error", "retain_error", "test_error", "val_error", "mia", "mia_efficacy")


def run_unlearning(
    cfg: RunConfig,
    log=print,
    backend=None,
    streams: dict | None = None,
    on_checkpoint=None,
    launched_at: float | None = None,
    expect_resume: bool = False,
    stop_file: Path | None = None,
) -> Path:
    """Unlearn under any backend: every process runs this function; only the main one logs and writes
    results, all of them evaluate (ZeRO-3 forwards are collective) and checkpoint. A launcher (Ray Train,
    engine/launchers/ray_train.py) passes its ``backend``, ``streams`` that replace the recipe's own,
    ``on_checkpoint(epoch, folder, history_row)``, its ``launched_at``, ``expect_resume`` (restarted after a
    failure: a checkpoint must exist) and ``stop_file`` (its request to checkpoint and stop)."""
    t_start = time.perf_counter()
    started_at = now()
    launched_at = launched_at or time.time()
    if cfg.model.path is None:
        raise ConfigError(
            "`unlearn run` needs model.path: the checkpoint to unlearn (e.g. runs/cifar5-train/original)"
        )
    check_output_dir(cfg.output_dir, cfg.overwrite)  # refuse before any work
    # another run's checkpoint: refused, also before any work
    resume = check_resumable(RunFolder.of(cfg.output_dir).partial, cfg, expected=expect_resume)
    rewind = bool(getattr(cfg.method, "rewind", False))
    if rewind and not cfg.eval.every_epoch:
        raise ConfigError("SCRUB+R (method.rewind=true) needs eval.every_epoch=true")
    seed_everything(cfg.seed)
    backend = backend or build_backend(cfg.backend)
    log = main_log(log, backend)
    method = build_method(cfg.method)
    # SCRUB+R's snapshots and a method's `prepare` (re-initialise, freeze, perturb) need the whole model in each
    # process: ZeRO 0-2 (every rank holds it; the main one snapshots and rewinds), not ZeRO-3
    if backend.zero_stage == 3 and (rewind or hasattr(method, "prepare")):
        raise ConfigError(
            f"method={cfg.method.name}{' with rewind' if rewind else ''} changes or snapshots the whole model "
            "outside the training steps, which ZeRO-3 shards: use backend.zero_stage=2 (or 0/1) for it"
        )
    data, image, transform = load_data_and_transform(cfg, cfg.model.path)
    log(
        f"forget set: {data.description}: {len(data.forget)} examples; retain {len(data.retain)}, "
        f"val {len(data.val)}, test {len(data.test)}"
    )
    load = partial(
        load_classifier, cfg.model.path, data.num_labels, cfg.model.revision, cfg.model.trust_remote_code
    )
    with backend.init_context():  # under ZeRO-3 each model is partitioned while it loads
        student = load()
        # the teacher: the same checkpoint, loaded again (a copy of a partitioned model would hold no weights)
        teacher = load() if method.needs_teacher or getattr(cfg.method, "param_distance", 0) else None
    if getattr(cfg.method, "k", None) is not None:
        last_blocks(student, cfg.method.k)  # CF-k / EU-k: a k beyond the model is refused before any work
    reference = load_classifier(cfg.eval.reference, data.num_labels) if cfg.eval.reference else None
    augment = getattr(cfg.method, "augment", False)
    own = {
        "forget": ImageStream(data.forget, transform, augment=augment),
        "retain": ImageStream(data.retain, transform, augment=augment),
    }
    if any(p.stream == "paired" for e in range(1, cfg.method.epochs + 1) for p in method.phases(e)):
        own["paired"] = PairedImageStream(own["forget"], own["retain"])
    streams = {**own, **(streams or {})}

    with staged_dir(cfg.output_dir, cfg.overwrite, backend, resume=resume) as stage:
        if backend.is_main:
            dump_config(cfg, stage / "config.yaml")
        tracker = Tracker(
            cfg.logging if backend.is_main else cfg.logging.model_copy(update={"wandb": False}),
            stage, name=Path(cfg.output_dir).name, config=cfg.model_dump(mode="json"),
        )  # fmt: skip
        evaluator = Evaluator(data, transform, cfg, backend.device, tracker)
        original = None  # a resumed run has the original's scores in its checkpoint
        if not resume and backend.zero_stage != 3:
            # before `prepare` may change it (ZeRO-3: after backend.prepare, when forwards can gather the shards;
            # no method with `prepare` runs there)
            original = evaluator(student.to(backend.device), attacks=True)
        snapshots = stage / "epochs"
        snapshot = rewind and backend.is_main  # every rank holds the same whole model (ZeRO 0-2)
        if snapshot and not resume:  # a resumed run keeps the snapshots it made before
            snapshots.mkdir()
            save_file(cpu_state(student), snapshots / "epoch_0.safetensors")

        t_prepare = time.perf_counter()
        if hasattr(method, "prepare"):  # before backend.prepare: what it freezes stays out of the optimizer
            method.prepare(student, _method_context(data, transform, backend))
        student, teacher = backend.prepare(student, teacher, cfg.method.build_optimizer)
        model = backend.unwrap(student)  # the Hugging Face module, for evaluation and export
        prepare_seconds = time.perf_counter() - t_prepare
        if not resume and original is None:
            original = evaluator(model, attacks=True)
        if not resume:
            evaluator.record(0, model, None, {}, metrics=original)
            log(f"original: {describe(original)}")
        losses: dict[str, list[float]] = {}
        ckpt = RunCheckpoints(
            stage, cfg, backend, student, model, streams, log=log,
            client_state=lambda: {"history": evaluator.history, "losses": losses, "original": original},
        )  # fmt: skip
        client = ckpt.restore() if resume else None
        if client is not None:
            evaluator.history, losses, original = client["history"], client["losses"], client["original"]

        first_step = []

        def on_step(epoch: int, phase: str, step: int, value: float) -> None:
            losses.setdefault(phase, []).append(value)
            if not first_step:
                first_step.append(time.time())
                log(f"first step done {first_step[0] - launched_at:.1f} s after launch")

        def on_epoch_end(epoch: int, epoch_losses: dict[str, float]) -> None:
            row = (
                evaluator.record(epoch, model, cfg.method.lr_at(epoch), epoch_losses)
                if cfg.eval.every_epoch
                else {"epoch": epoch}
            )
            if snapshot:
                save_file(cpu_state(model), snapshots / f"epoch_{epoch}.safetensors")
            ckpt.end_of_epoch(epoch)
            if on_checkpoint is not None:
                on_checkpoint(epoch, ckpt.folder, row)
            log(f"epoch {epoch}: losses {epoch_losses} {describe(row)}")

        t_loop = time.perf_counter()
        ckpt.run(method, teacher, streams, classifier_logits, epochs=cfg.method.epochs, on_step=on_step,
                 on_epoch_end=on_epoch_end, stop_file=stop_file)  # fmt: skip
        loop_seconds = time.perf_counter() - t_loop + prepare_seconds
        first = ckpt.start["epoch"] if ckpt.start else 1  # evaluations before a resume were not in this loop
        train_seconds = evaluator.training_seconds(loop_seconds, since=first)
        final = evaluator(model, attacks=True)
        log(f"{cfg.method.name}: {describe(final)}")
        ref_metrics = evaluator(reference.to(backend.device), attacks=True) if reference is not None else None
        memory = backend.memory_report()
        weights = backend.full_state_dict(student)  # collective under ZeRO-3

        settings = cfg.method.model_dump(mode="json")
        record = {"forget": data.forget_summary(), "method": settings, "base_model": cfg.model.path}
        title = f"{cfg.method.name.upper()} unlearning: {data.description}"
        card_metrics = {k: final[k] for k in REPORTED}
        if backend.is_main:
            save_checkpoint(
                model,
                stage / "model",
                image_processor(image),
                model_card(title, cfg.model.path, data.forget_summary(), settings, card_metrics),
                {**record, "metrics": final},
                state_dict=weights,
            )
        artifacts = {"model": "model", "config": "config.yaml"}

        rewound = None
        if snapshot:  # in the main process only (the evaluation of a plain copy has no collectives)
            # SCRUB+R: target = the final model's error on the forget-validation set; pick the saved
            # epoch (0 = original) whose forget error is closest (ties: earliest).
            errors = [row["forget_error"] for row in evaluator.history]
            target = final["forget_val_error"]
            j = select_rewind_epoch(errors, target)
            chosen = copy.deepcopy(model)
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
        if backend.is_main:
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
                    "seconds_to_first_step": first_step[0] - launched_at if first_step else None,
                    "first_step_at": first_step[0] if first_step else None,  # time.time() of the first step
                    "backend": {
                        "name": backend.name,
                        "world_size": backend.world_size,
                        "zero_stage": backend.zero_stage,
                        "accumulation": backend.accum,
                    },  # fmt: skip
                    "memory": memory,
                    "artifacts": artifacts,
                },
            )
    out = Path(cfg.output_dir)
    log(f"done: model in {out / 'model'}, report in {out / 'report.md'}")
    backend.close()
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
