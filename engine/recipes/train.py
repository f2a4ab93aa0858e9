"""`unlearn train`: the models to unlearn and to compare with, by one recipe (``cfg.train``), for any
task, on the single-process and DeepSpeed backends.

The task names the models (engine/tasks): for image classifiers the ``original`` (trained on D = D_r +
D_f, from scratch with ``model.arch`` or fine-tuned from ``model.path``) and ``retrain`` (the same recipe
and seed on D_r alone: exact unlearning, the gold standard; D_r as is, not padded back to |D| with
duplicates as the authors' code does); for causal LMs the ``retain`` model first (the reference the
original's forget quality and privleak are measured against) and then the ``original`` (TOFU full).

Each target checkpoints after every epoch (and where a SIGTERM lands) in ``OUTPUT.partial/checkpoints/
<target>``; the same command run again skips the targets already finished and resumes the one that was not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.backends import build_backend
from engine.checkpoint.export import check_output_dir, staged_dir
from engine.checkpoint.resume import RunCheckpoints, check_resumable
from engine.checkpoint.run_folder import RunFolder
from engine.config import RunConfig, dump_config
from engine.errors import ConfigError
from engine.eval.report import write_report
from engine.methods import Erm
from engine.recipes.common import backend_summary, main_log, seed_everything
from engine.tasks import build_task, task_class
from engine.tracking import Tracker


def run_training(cfg: RunConfig, targets: tuple[str, ...] | None = None, log=print) -> Path:
    names = task_class(cfg.task).targets(cfg)
    targets = tuple(targets or names)
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ConfigError(
            f"unknown train targets {unknown}; with task={cfg.task} choose from {', '.join(names)}"
        )
    if cfg.model.path is None and cfg.model.arch is None:
        raise ConfigError(
            "`unlearn train` needs model.arch (e.g. preact_resnet18) or model.path, the checkpoint to fine-tune"
        )
    check_output_dir(cfg.output_dir, cfg.overwrite)
    order = [t for t in names if t in targets]  # the reference first: the others are scored against it
    resume = check_resumable(RunFolder.of(cfg.output_dir).partial, cfg, tuple(f"checkpoints/{t}" for t in order),
                             finished=tuple(f"{t}/report.json" for t in order))  # fmt: skip
    backend = build_backend(cfg.backend)
    log = main_log(log, backend)
    task = build_task(cfg, None if cfg.model.arch else cfg.model.path)
    log(task.description)
    reference = None
    with staged_dir(cfg.output_dir, cfg.overwrite, backend, resume=resume) as stage:
        if backend.is_main:
            dump_config(cfg, stage / "config.yaml")
        for target in order:
            out = stage / target
            if backend.broadcast_object((out / "report.json").is_file()):  # report.json is written last
                log(f"{target}: finished before the interruption, kept ({out})")
                if target == task.reference_target:  # its scores, for the models scored against it
                    reference = json.loads((out / "report.json").read_text())["metrics"]
                continue
            t0 = time.perf_counter()
            seed_everything(cfg.seed)  # same seed for every target: the only difference is the data
            with backend.init_context():  # under ZeRO-3 partitioned while it loads
                model = task.build()
            task.check(model)
            engine, _ = backend.prepare(model, None, cfg.train.build_optimizer)
            model = backend.unwrap(engine)
            streams = {"retain": task.train_stream(target)}
            tracker = Tracker(
                cfg.logging if backend.is_main else cfg.logging.model_copy(update={"wandb": False}),
                stage, name=f"{Path(cfg.output_dir).name}-{target}", config=cfg.model_dump(mode="json"),
            )  # fmt: skip
            history: list[dict] = []
            losses: dict[str, list[float]] = {}
            ckpt = RunCheckpoints(
                stage, cfg, backend, engine, model, streams, log=log, name=f"checkpoints/{target}",
                client_state=lambda history=history, losses=losses: {"history": history, "losses": losses},
            )  # fmt: skip
            client = ckpt.restore() if resume else None  # None also when this target had not begun
            if client is not None:
                history += client["history"]
                losses.update(client["losses"])

            def on_step(epoch, phase, step, value, losses=losses):
                losses.setdefault(phase, []).append(value)

            def on_epoch_end(epoch, epoch_losses, model=model, target=target, history=history, ckpt=ckpt,
                             tracker=tracker):  # fmt: skip
                row = {"epoch": epoch}
                if cfg.eval.every_epoch:
                    row = task.history_row(model, backend.device, epoch, cfg.train.lr_at(epoch), epoch_losses)
                    history.append(row)
                    tracker.log({k: v for k, v in row.items() if v is not None}, step=epoch)
                ckpt.end_of_epoch(epoch)
                log(
                    f"{target} epoch {epoch}: loss {epoch_losses.get('min', float('nan')):.4f} {task.describe(row)}"
                )

            t_loop = time.perf_counter()
            ckpt.run(Erm(cfg.train), None, streams, task.forward, epochs=cfg.train.epochs, on_step=on_step,
                     on_epoch_end=on_epoch_end)  # fmt: skip
            loop_seconds = time.perf_counter() - t_loop
            first = (
                ckpt.start["epoch"] if ckpt.start else 1
            )  # evaluations before a resume were not in this loop
            train_seconds = loop_seconds - sum(r["eval_seconds"] for r in history if r["epoch"] >= first)
            tracker.finish()
            settings = {**cfg.train.model_dump(mode="json"), "trained_on": task.trained_on[target]}
            title = f"{target.capitalize()} model ({cfg.model.arch or cfg.model.path})"
            weights = backend.full_state_dict(engine)  # collective under ZeRO-3
            memory = backend.memory_report()
            metrics = task.evaluate(model, backend.device, reference, backend=backend)
            if backend.is_main:
                task.save(model, out, title, settings, metrics, weights, {"target": target},
                          forget=target != "original")  # fmt: skip
                task.keep_scores(out, metrics, reference)  # a later run scoring this model reads them
            if target == task.reference_target:
                reference = metrics
            log(f"{target}: {task.describe(metrics)} ({train_seconds:.1f} s training)")
            if backend.is_main:
                write_report(
                    out,
                    {
                        "title": title,
                        "task": task.name,
                        "suite": task.suite,
                        "command": "train",
                        "method": settings,
                        "forget": task.forget_summary(),
                        "metrics": metrics,
                        "history": history,
                        "losses": losses,
                        "seconds": time.perf_counter() - t0,
                        "loop_seconds": loop_seconds,
                        "train_seconds": train_seconds,
                        "resume": ckpt.report(),
                        "backend": backend_summary(backend),
                        "memory": memory,
                        "artifacts": {"model": "."},
                    },
                )
                ckpt.remove()
    out = Path(cfg.output_dir)
    log(f"done: {', '.join(str(out / t) for t in order)}")
    backend.close()
    return out
