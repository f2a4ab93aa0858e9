"""`unlearn run`: unlearn a checkpoint of any task (SCRUB, SCRUB+R, or another registered method), on any
backend.

Reads top to bottom: check inputs -> the task (data, streams, how models load and are scored) -> load the
student and the frozen teacher (partitioned while they load under ZeRO-3) -> score the reference and the
original -> the method's optional ``prepare`` (re-initialise, freeze, perturb: engine.methods.base) -> the
backend builds the optimizer over the parameters left trainable -> the one loop, a history row (and, for
SCRUB+R, a snapshot) after each epoch, a resumable checkpoint after each -> final scores -> SCRUB+R
selection -> export the model, receipt and report on the main rank.

Every process runs this function; only the main one logs and writes results; all of them evaluate (ZeRO-3
forwards are collective) and checkpoint. ``loop_seconds`` / ``train_seconds`` include ``prepare_seconds``
(all of Fisher forgetting's cost, Retrain's re-initialisation), so every method's time is its whole cost.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

from engine import faults
from engine.backends import build_backend
from engine.checkpoint import provenance
from engine.checkpoint.export import check_output_dir, staged_dir
from engine.checkpoint.hub import check_push, push_run
from engine.checkpoint.receipt import now, write_receipt
from engine.checkpoint.resume import RunCheckpoints, check_resumable
from engine.checkpoint.run_folder import RunFolder, removed_after
from engine.config import RunConfig, dump_config
from engine.data.paired import PairedStream
from engine.errors import ConfigError
from engine.eval.report import write_report, write_text_atomic
from engine.methods import build_method
from engine.methods.blocks import last_blocks
from engine.methods.scrub import select_rewind_epoch
from engine.models.causal_lm import set_dropout
from engine.models.lora import AdapterDisabled, apply_lora, lora_summary
from engine.recipes.common import (
    backend_summary,
    load_frozen,
    log_memory,
    main_log,
    seed_everything,
    training_seconds,
)
from engine.tasks import build_task
from engine.teacher_cache import fill_teacher_cache
from engine.tracking import Tracker


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
    """Unlearn ``model.path``. A launcher (Ray Train, engine/launchers/ray_train.py) passes its ``backend``,
    ``streams`` that replace the task's forget and retain streams (token stores its driver wrote),
    ``on_checkpoint(epoch, folder, history_row)`` (ray.train.report), its ``launched_at``, ``expect_resume``
    (restarted after a failure: a checkpoint must exist) and ``stop_file`` (its request to checkpoint and
    stop: engine/checkpoint/signals.py). Each epoch ends with a resumable checkpoint in
    ``OUTPUT.partial/checkpoints``; started again with the same config, a run resumes after the last one."""
    t_start = time.perf_counter()
    started_at = now()
    launched_at = launched_at or time.time()
    if cfg.model.path is None:
        raise ConfigError(
            "`unlearn run` needs model.path: the checkpoint to unlearn (e.g. runs/cifar5-train/original)"
        )
    check_output_dir(cfg.output_dir, cfg.overwrite)  # refuse before any work
    check_push(cfg.output.push_to_hub)  # also before any work: a push that cannot happen
    provenance.reset()  # the receipt names what this run reads, from here on
    # another run's checkpoint: refused, also before any work
    resume = check_resumable(RunFolder.of(cfg.output_dir).partial, cfg, expected=expect_resume)
    rewind = bool(getattr(cfg.method, "rewind", False))
    if rewind and not cfg.eval.every_epoch:
        raise ConfigError("SCRUB+R (method.rewind=true) needs eval.every_epoch=true")
    if getattr(cfg.method, "schedule", "paper") == "calibrated" and not cfg.eval.every_epoch:
        raise ConfigError(
            "method.schedule=calibrated decides after each epoch from its errors: set eval.every_epoch=true"
        )
    seed_everything(cfg.seed)
    backend = backend or build_backend(cfg.backend)
    log = main_log(log, backend)
    method = build_method(cfg.method)
    # a method's `prepare` (re-initialise, freeze, perturb) needs the whole model in each process: ZeRO 0-2, not 3
    if backend.zero_stage == 3 and hasattr(method, "prepare"):
        raise ConfigError(
            f"method={cfg.method.name} changes the whole model outside the training steps, which ZeRO-3 shards: "
            "use backend.zero_stage=2 (or 0/1) for it"
        )
    task = build_task(cfg, cfg.model.path)
    log(task.description)
    device = backend.device
    m = cfg.model
    use_cache = teacher_cache_wanted(cfg.method, method, log)
    needs_teacher = (method.needs_teacher and not use_cache) or getattr(cfg.method, "param_distance", 0)
    with backend.init_context():  # under ZeRO-3 each model is partitioned while it loads
        student = task.load(m.path, m.revision, m.trust_remote_code)
        # the teacher: the same checkpoint, loaded again (a copy of a partitioned model would hold no weights);
        # a LoRA student's teacher is its own base weights (below), so nothing is loaded twice
        load_teacher = needs_teacher and m.lora is None
        teacher = task.load(m.path, m.revision, m.trust_remote_code) if load_teacher else None
    task.check(student)
    if m.lora is not None and hasattr(method, "prepare"):
        raise ConfigError(
            f"method={cfg.method.name} re-initialises or edits the whole model before training, which a LoRA "
            "student cannot: unset model.lora for it"
        )
    lora = None
    if m.lora is not None:  # only the adapters train; refused here (one line) when no module matches
        student = apply_lora(student, m.lora)
        lora = lora_summary(student, m.lora)  # for the record, the receipt and the model card
    if getattr(cfg.method, "k", None) is not None:
        last_blocks(student, cfg.method.k)  # CF-k / EU-k: a k beyond the model is refused before any work
    if getattr(cfg.method, "student_dropout", None) is not None:
        set_dropout(student, cfg.method.student_dropout)  # the teacher stays in eval mode: no dropout there

    reference = None
    if cfg.eval.reference:  # loaded only when its cached scores miss
        reference = task.evaluate(partial(load_frozen, backend, task, cfg.eval.reference), device,
                                  cache_dir=cfg.eval.reference, backend=backend)  # fmt: skip
    run_folder = RunFolder.of(cfg.output_dir)
    with (
        staged_dir(cfg.output_dir, cfg.overwrite, backend, resume=resume) as stage,
        removed_after(None if streams else run_folder.tokens, backend),  # a launcher's stores are its own
    ):
        # a launcher's streams replace the task's forget and retain streams (which are then never built); a text
        # task's are tokenized once into OUTPUT.tokens, which every rank reads by row
        run_streams = dict(streams) if streams else task.streams(
            augment=getattr(cfg.method, "augment", False), folder=run_folder.tokens, backend=backend
        )  # fmt: skip
        if "paired" in method.needs:
            run_streams["paired"] = PairedStream(run_streams["forget"], run_streams["retain"])
        if backend.is_main:
            dump_config(cfg, stage / "config.yaml")
        tracker = Tracker(
            cfg.logging if backend.is_main else cfg.logging.model_copy(update={"wandb": False}),
            stage, name=Path(cfg.output_dir).name, config=cfg.model_dump(mode="json"),
        )  # fmt: skip
        original = None  # a resumed run has the original's scores in its checkpoint
        if not resume and hasattr(method, "prepare"):  # scored before `prepare` changes it (never ZeRO-3)
            original = task.evaluate(student, device, reference, cache_dir=m.path, backend=backend)
        t_prepare = time.perf_counter()
        if hasattr(method, "prepare"):  # before backend.prepare: what it freezes stays out of the optimizer
            method.prepare(student, task.method_context(backend))
        student, teacher = backend.prepare(student, teacher, cfg.method.build_optimizer)
        model = backend.unwrap(student)  # the Hugging Face module, for evaluation and export
        if m.lora is not None and needs_teacher:
            teacher = AdapterDisabled(model)  # the base weights, adapters disabled: never in the optimizer
        prepare_seconds = time.perf_counter() - t_prepare
        teacher_before = backend.fingerprint(teacher) if teacher is not None else None
        if not resume and original is None:  # ZeRO-3: now that forwards can gather the shards
            original = task.evaluate(model, device, reference, cache_dir=m.path, backend=backend)
        history: list[dict] = []
        losses: dict[str, list[float]] = {}
        checks: list[dict] = []  # the calibrated schedule's checks inside max phases
        calibrated = getattr(cfg.method, "schedule", "paper") == "calibrated"
        ckpt = RunCheckpoints(
            stage, cfg, backend, student, model, run_streams, log=log, keep_all=rewind,  # SCRUB+R picks one
            client_state=lambda: {"history": history, "losses": losses, "original": original,
                                  "seen": backend.gather_object(backend.seen),
                                  **({"schedule": method.state_dict(), "checks": checks} if calibrated else {})},
        )  # fmt: skip
        client = ckpt.restore() if resume else None
        if client is not None:
            history, losses, original = client["history"], client["losses"], client["original"]
            if calibrated:  # the decisions taken before the stop: the resumed run's phases follow them
                method.load_state_dict(client["schedule"])
                checks = client["checks"]
            seen = client["seen"][backend.rank] if backend.rank < len(client["seen"]) else {}
            backend.seen.update({k: {int(e): rows for e, rows in v.items()} for k, v in seen.items()})
        else:
            history.append(task.history_row(model, device, 0, None, {}, metrics=original))
            # SCRUB's calibrated schedule: an original already at its target needs no max-step at all
            if calibrated:
                history[0].update(calibrate(method, 0, task.calibration(history[0]), backend))
            if (
                rewind
            ):  # SCRUB+R's epoch 0 is the original: a checkpoint of the start (resuming it = starting)
                ckpt.end_of_epoch(0)
        log(f"original: {task.describe(original)}")

        first_step = []

        def on_step(epoch: int, phase: str, step: int, value: float) -> None:
            losses.setdefault(phase, []).append(value)
            if not first_step:
                first_step.append(time.time())
                log(f"first step done {first_step[0] - launched_at:.1f} s after launch")

        def on_epoch_end(epoch: int, epoch_losses: dict[str, float]) -> None:
            row = {"epoch": epoch}
            if cfg.eval.every_epoch:
                row = task.history_row(model, device, epoch, cfg.method.lr_at(epoch), epoch_losses)
                if calibrated:  # before the checkpoint, which holds the decision for the next epoch
                    row.update(calibrate(method, epoch, task.calibration(row), backend))
                history.append(row)
                tracker.log({k: v for k, v in row.items() if v is not None}, step=epoch)
            ckpt.end_of_epoch(epoch)
            if on_checkpoint is not None:
                on_checkpoint(epoch, ckpt.folder, row)
            faults.inject("after_checkpoint", epoch, backend.rank)
            log(f"epoch {epoch}: losses {epoch_losses} {task.describe(row)}")

        t_loop = time.perf_counter()
        teacher_outputs = None
        if use_cache:  # its time is the run's: it replaces every epoch's teacher forwards
            # the student before its first step IS the teacher; a resumed one has moved, so the teacher is
            # loaded for this pass only (a LoRA student's: its base weights)
            source = model
            if resume:
                source = AdapterDisabled(model) if m.lora else load_frozen(backend, task, m.path, m.revision,
                                                                           m.trust_remote_code)  # fmt: skip
            names = sorted(
                method.streams() if hasattr(method, "streams")  # a method whose phases are decided as it goes
                else {p.stream for e in range(1, cfg.method.epochs + 1) for p in method.phases(e)}
            )  # fmt: skip
            teacher_outputs = fill_teacher_cache(
                source, {n: run_streams[n] for n in names}, task.forward, backend, batch_size=cfg.eval.batch_size,
                temperature=cfg.method.temperature, topk=cfg.method.teacher_cache_topk,
                budget_bytes=cfg.method.teacher_cache_bytes, progress=cfg.logging.progress,
            )  # fmt: skip
            del source
            log(f"teacher outputs cached in {teacher_outputs.seconds:.1f} s: " + ", ".join(
                f"{k} {v['kind']} {v['bytes']:,} B" + (f" (tail mass {v['tail_mass_mean']:.2g})" if "topk" in v else "")
                for k, v in teacher_outputs.summary()["streams"].items()))  # fmt: skip
        end_phase = None
        if calibrated:

            def end_phase(epoch: int, phase: str, step: int) -> bool:
                # the calibrated schedule's check inside a max phase: the main rank's forget error, broadcast
                if phase != "max" or not method.check_due(epoch, step):
                    return False
                started = time.perf_counter()
                measured = backend.broadcast_object(task.forget_error(model, device))
                ended = method.check(epoch, step, measured)
                checks.append({"epoch": epoch, "step": step, "forget_error": measured, "ended": ended,
                               "seconds": round(time.perf_counter() - started, 4)})  # fmt: skip
                if ended:
                    log(f"epoch {epoch}: max phase ended after {step} max-steps: the forget set's "
                        f"{task.calibration_measure} {measured:.4g} reached its target "
                        f"{method.schedule_state.target_error:.4g}")  # fmt: skip
                return ended

        ckpt.run(method, teacher, run_streams, task.forward, epochs=cfg.method.epochs, on_step=on_step,
                 on_epoch_end=on_epoch_end, stop_file=stop_file, teacher_outputs=teacher_outputs,
                 end_phase=end_phase)  # fmt: skip
        loop_seconds = time.perf_counter() - t_loop + prepare_seconds
        first = ckpt.start["epoch"] if ckpt.start else 1  # evaluations before a resume were not in this loop
        train_seconds = loop_seconds - sum(r["eval_seconds"] for r in history if r["epoch"] >= first)
        memory = backend.memory_report()
        log_memory(log, memory)
        teacher_check = None
        if teacher is not None:
            after = backend.fingerprint(teacher)
            teacher_check = {"sha256_before": teacher_before, "sha256_after": after,
                             "unchanged": after == teacher_before}  # fmt: skip
            if not teacher_check["unchanged"]:
                log(
                    "WARNING: the frozen teacher's weights changed during the run; this is a bug, please report it"
                )
        shards = backend.gather_object(backend.seen)
        final = task.evaluate(model, device, reference, backend=backend)
        log(f"{cfg.method.name}: {task.describe(final)}")
        settings = cfg.method.model_dump(mode="json")
        title = f"{cfg.method.name} unlearning: {task.forget_summary()['description']}"
        weights = backend.full_state_dict(student)  # collective under ZeRO-3
        record = {"lora": lora} if lora else None  # also says which export: merged or adapter
        if backend.is_main:
            task.save(model, stage / "model", title, settings, final, weights, record)
        artifacts = {"model": "model", "config": "config.yaml"}

        rewound = None
        if rewind:
            # SCRUB+R: the epoch (0 = original) whose forget series is closest to the target (ties: earliest), the
            # task saying what the series and target are; its weights come back from that epoch's checkpoint on
            # every rank (under ZeRO-3 each its partition), then it is scored and exported as the final model was
            series, target, steering = task.rewind_series(history, final)
            if calibrated:  # the target the max phases steered by (frozen at epoch 0): both aim at one number
                target = history[0]["target_error"]
                rest = {k: v for k, v in steering.items() if not k.startswith("target_")}
                steering = {"target_error": target, "steered_by": "target_error", **rest}
            j = select_rewind_epoch(series, target)
            ckpt.store.check(f"epoch_{j}")  # verified against its manifest before it is read
            backend.load_checkpoint(ckpt.folder, f"epoch_{j}", student, weights_only=False)
            rewound_metrics = task.evaluate(model, device, reference, backend=backend)
            rewound = {"epoch": j, **steering, "metrics": rewound_metrics}
            rsettings = {**settings, "rewound_to_epoch": j}
            weights = backend.full_state_dict(student)
            if backend.is_main:
                task.save(model, stage / "model_rewound", f"SCRUB+R (epoch {j}): {title}", rsettings,
                          rewound_metrics, weights, record)  # fmt: skip
            artifacts["model_rewound"] = "model_rewound"
            log(f"SCRUB+R: target {target:.4g} -> epoch {j}: {task.describe(rewound_metrics)}")

        tracker.finish()
        if backend.is_main:
            ids = {name: task.row_ids(name) for name in ("forget", "retain")}
            write_text_atomic(stage / "shards.json", json.dumps(_shard_ids(shards, ids)) + "\n")
            write_receipt(
                stage, forget=task.forget_summary(), input_model=m.path, revision=m.revision,
                outputs={k: v for k, v in artifacts.items() if k.startswith("model")}, method=settings,
                metrics=final, started_at=started_at, sources=provenance.loaded(), lora=lora,
            )  # fmt: skip
            ckpt.remove()  # the run is complete: the exported model is the result
            write_report(
                stage,
                {
                    "title": title,
                    "task": task.name,
                    "suite": task.suite,
                    "command": "run",
                    "method": settings,
                    "forget": task.forget_summary(),
                    "metrics": final,
                    "original": original,
                    "reference": reference,
                    "rewound": rewound,
                    "history": history,
                    "schedule_checks": checks if calibrated else None,
                    "losses": losses,
                    "seconds": time.perf_counter() - t_start,
                    "loop_seconds": loop_seconds,
                    "prepare_seconds": prepare_seconds,
                    "train_seconds": train_seconds,
                    "reference_seconds": training_seconds(cfg.eval.reference),  # Retrain's, for the verdict
                    "resumed_from_epoch": first - 1 if ckpt.start else None,
                    "resume": ckpt.report(),
                    "seconds_to_first_step": first_step[0] - launched_at if first_step else None,
                    "first_step_at": first_step[0] if first_step else None,  # time.time() of the first step
                    "backend": backend_summary(backend),
                    "memory": memory,
                    "teacher": teacher_check,
                    "teacher_cache": teacher_outputs.summary() if teacher_outputs is not None else None,
                    "lora": lora,
                    "artifacts": artifacts,
                },
            )
    out = Path(cfg.output_dir)
    log(f"done: model in {out / 'model'}, report in {out / 'report.md'}")
    main = backend.is_main
    backend.close()
    if cfg.output.push_to_hub and main:  # once the run folder is in place: a failed upload loses nothing
        push_run(out, cfg.output.push_to_hub, cfg.output.private, log)
    return out


def calibrate(method, epoch: int, measured: tuple[float, float], backend) -> dict:
    """SCRUB's calibrated schedule after ``epoch``: the method's rule applied to (forget error, target) as the
    main rank measured them, broadcast so that every rank takes the same decision (each rank evaluates with its
    own BatchNorm statistics, which may differ in the last digits); the decision goes into the history row."""
    forget_error, target = backend.broadcast_object(tuple(float(x) for x in measured))
    return {"forget_target_error": target, **method.end_epoch(epoch, forget_error, target)}


def teacher_cache_wanted(settings, method, log) -> bool:
    """Whether the teacher's outputs are computed once (``method.teacher_cache=auto``), and when auto cannot,
    why (logged): they are the same every epoch only when the rows are, and the teacher's weights are never
    needed."""
    if getattr(settings, "teacher_cache", "off") == "off" or not method.needs_teacher:
        return False
    if hasattr(method, "teacher_for"):
        return False  # a method choosing its own teacher per phase (none with teacher_cache today)
    if getattr(settings, "augment", False):
        log("teacher_cache: off, because method.augment=true shows new crops and flips every epoch")
        return False
    if getattr(settings, "param_distance", 0):
        log("teacher_cache: off, because method.param_distance needs the teacher's weights")
        return False
    return True


def _shard_ids(shards: list[dict], ids: dict[str, list | None]) -> dict:
    """stream -> epoch -> rank -> the example ids that rank trained on (ids, never content)."""
    out: dict = {}
    for rank, seen in enumerate(shards):
        for stream, epochs in seen.items():
            table = ids.get(stream)
            for epoch, rows in epochs.items():
                slot = out.setdefault(stream, {}).setdefault(str(epoch), {})
                slot[str(rank)] = [table[r] for r in rows] if table else rows
    return out
