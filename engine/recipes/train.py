"""`unlearn train`: the models to unlearn and to compare with, by one recipe (``cfg.train``).

- ``original``: trained on D = D_r + D_f (what a user would hold).
- ``retrain``: the same recipe, same seed, on D_r alone (exact unlearning, the gold standard). We use
  D_r as is, not padded back to |D| with duplicates as the authors' code does.

Each target checkpoints after every epoch (and where a SIGTERM lands) in ``OUTPUT.partial/checkpoints/
<target>``; the same command run again skips the targets already finished and resumes the one that was not.
"""

from __future__ import annotations

import time
from pathlib import Path

from engine.backends import build_backend
from engine.checkpoint.export import (
    check_output_dir,
    image_processor,
    model_card,
    save_checkpoint,
    staged_dir,
)
from engine.checkpoint.resume import RunCheckpoints, check_resumable
from engine.checkpoint.run_folder import RunFolder
from engine.config import RunConfig, dump_config
from engine.data.vision import ImageStream
from engine.errors import ConfigError
from engine.eval.report import write_report
from engine.methods import Erm
from engine.models.loading import build_classifier, classifier_logits, load_classifier
from engine.recipes.common import (
    Evaluator,
    describe,
    load_data_and_transform,
    seed_everything,
)
from engine.tracking import Tracker

TARGETS = ("original", "retrain")


def run_training(cfg: RunConfig, targets: tuple[str, ...] = TARGETS, log=print) -> Path:
    if cfg.model.path is None and cfg.model.arch is None:
        raise ConfigError(
            "`unlearn train` needs model.arch (e.g. preact_resnet18) or model.path to fine-tune"
        )
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown train targets {unknown}; choose from {TARGETS}")
    check_output_dir(cfg.output_dir, cfg.overwrite)
    partial_dir = RunFolder.of(cfg.output_dir).partial
    resume = check_resumable(partial_dir, cfg, tuple(f"checkpoints/{t}" for t in targets),
                             finished=tuple(f"{t}/report.json" for t in targets))  # fmt: skip
    data, image, transform = load_data_and_transform(cfg, None if cfg.model.arch else cfg.model.path)
    log(f"forget set: {data.description}: {len(data.forget)} examples; retain {len(data.retain)}")
    backend = build_backend(cfg.backend)
    with staged_dir(cfg.output_dir, cfg.overwrite, resume=resume) as stage:
        dump_config(cfg, stage / "config.yaml")
        for target in targets:
            if (stage / target / "report.json").is_file():  # report.json is written last
                log(f"{target}: finished before the interruption, kept ({stage / target})")
                continue
            t0 = time.perf_counter()
            seed_everything(cfg.seed)  # same seed for both: the only difference is the data
            if cfg.model.arch:  # from scratch; model.path is then where `run` will find the result
                model = build_classifier(cfg.model.arch, data.num_labels, cfg.model.width, data.class_names)
            else:  # fine-tune a pretrained checkpoint
                model = load_classifier(
                    cfg.model.path, data.num_labels, cfg.model.revision, cfg.model.trust_remote_code
                )
            method = Erm(cfg.train)
            model, _ = backend.prepare(model, None, cfg.train.build_optimizer)
            train_set = data.train if target == "original" else data.retain
            streams = {"retain": ImageStream(train_set, transform, augment=cfg.train.augment)}
            tracker = Tracker(
                cfg.logging,
                stage,
                name=f"{Path(cfg.output_dir).name}-{target}",
                config=cfg.model_dump(mode="json"),
            )
            evaluator = Evaluator(data, transform, cfg, backend.device, tracker)
            losses: dict[str, list[float]] = {}
            ckpt = RunCheckpoints(
                stage, cfg, backend, model, model, streams, log=log, name=f"checkpoints/{target}",
                client_state=lambda evaluator=evaluator, losses=losses: {"history": evaluator.history, "losses": losses},
            )  # fmt: skip
            client = ckpt.restore() if resume else None  # None also when this target had not begun
            if client is not None:
                evaluator.history = client["history"]
                losses.update(client["losses"])

            def on_step(epoch, phase, step, value, losses=losses):
                losses.setdefault(phase, []).append(value)

            def on_epoch_end(epoch, epoch_losses, evaluator=evaluator, model=model, target=target, ckpt=ckpt):
                row = (
                    evaluator.record(epoch, model, cfg.train.lr_at(epoch), epoch_losses)
                    if cfg.eval.every_epoch
                    else {}
                )
                ckpt.end_of_epoch(epoch)
                log(
                    f"{target} epoch {epoch}: loss {epoch_losses.get('min', float('nan')):.4f} {describe(row)}"
                )

            t_loop = time.perf_counter()
            ckpt.run(method, None, streams, classifier_logits, epochs=cfg.train.epochs, on_step=on_step,
                     on_epoch_end=on_epoch_end)  # fmt: skip
            loop_seconds = time.perf_counter() - t_loop
            train_seconds = evaluator.training_seconds(
                loop_seconds, since=ckpt.start["epoch"] if ckpt.start else 1
            )
            metrics = evaluator(model, attacks=True)
            tracker.finish()
            log(f"{target}: {describe(metrics)} ({loop_seconds:.1f}s)")
            settings = {
                **cfg.train.model_dump(mode="json"),
                "trained_on": "D (forget + retain)" if target == "original" else "D_r (retain only)",
            }
            forget = data.forget_summary() if target == "retrain" else None
            title = f"{target.capitalize()} model ({cfg.model.arch or cfg.model.path})"
            save_checkpoint(
                model,
                stage / target,
                image_processor(image),
                model_card(title, cfg.model.path, forget, settings, {k: v for k, v in metrics.items()}),
                {"forget": data.forget_summary(), "method": settings, "metrics": metrics, "target": target},
            )
            write_report(
                stage / target,
                {
                    "title": title,
                    "command": "train",
                    "method": settings,
                    "forget": data.forget_summary(),
                    "metrics": metrics,
                    "original": None,
                    "reference": None,
                    "rewound": None,
                    "history": evaluator.history,
                    "losses": losses,
                    "seconds": time.perf_counter() - t0,
                    "loop_seconds": loop_seconds,
                    "train_seconds": train_seconds,
                    "resume": ckpt.report(),
                    "artifacts": {"model": "."},
                },
            )
            ckpt.remove()
    out = Path(cfg.output_dir)
    log(f"done: {', '.join(str(out / t) for t in targets)}")
    return out
