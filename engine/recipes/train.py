"""`unlearn train`: the models to unlearn and to compare with, by one recipe (``cfg.train``), for any task, on the
single-process and DeepSpeed backends.

The task names the models (engine/config/rules.py: ``train_targets``): for image classifiers the ``original``
(trained on D = D_r + D_f, from scratch with ``model.arch`` or fine-tuned from ``model.path``) and ``retrain`` (the
same recipe and seed on D_r alone: exact unlearning, the gold standard; D_r as is, not padded back to |D| with
duplicates as the authors' code does); for causal LMs the ``retain`` model first (the reference the original's
forget quality and privleak are measured against) and then the ``original`` (TOFU full).

Over one session (session.py), each target in its stages: ``setup`` (a fresh model, the optimizer), ``restore``
(its checkpoint, when an earlier attempt stopped inside it), ``train`` (the one loop, a history row and a
checkpoint after every epoch and where a SIGTERM lands, in ``OUTPUT.partial/checkpoints/<target>``) and ``finish``
(its scores, the model, its report). The same command run again skips the targets already finished and resumes
the one that was not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.config import RunConfig, train_targets
from engine.methods import Erm
from engine.recipes.session import Session, seed_everything
from engine.tasks import build_task


def run_training(cfg: RunConfig, targets: tuple[str, ...] | None = None, log=print) -> Path:
    return Training(cfg, targets, log).run()


class Training:
    def __init__(self, cfg: RunConfig, targets: tuple[str, ...] | None = None, log=print):
        names = train_targets(cfg)
        self.order = [
            t for t in names if t in (targets or names)
        ]  # the reference first: others are scored by it
        self.session = Session(
            cfg, "train", log, targets=targets, checkpoints=tuple(f"checkpoints/{t}" for t in self.order),
            finished=tuple(f"{t}/report.json" for t in self.order),
        )  # fmt: skip
        self.cfg, self.backend, self.log = cfg, self.session.backend, self.session.log
        self.reference: dict | None = None

    def run(self) -> Path:
        cfg = self.cfg
        self.task = build_task(cfg, None if cfg.model.arch else cfg.model.path)
        self.log(self.task.description)
        with self.session.stage() as stage:
            for target in self.order:
                out = stage / target
                if self.backend.broadcast_object(
                    (out / "report.json").is_file()
                ):  # report.json is written last
                    self.log(f"{target}: finished before the interruption, kept ({out})")
                    if target == self.task.reference_target:  # its scores, for the models scored against it
                        self.reference = json.loads((out / "report.json").read_text())["metrics"]
                    continue
                self.setup(stage, target)
                self.restore()
                self.train()
                self.finish(out)
        self.log(f"done: {', '.join(str(self.session.out / t) for t in self.order)}")
        return self.session.close()

    def setup(self, stage: Path, target: str) -> None:
        self.t0, self.target = time.perf_counter(), target
        seed_everything(self.cfg.seed)  # same seed for every target: the only difference is the data
        with self.backend.init_context():  # under ZeRO-3 partitioned while it loads
            model = self.task.build()
        self.task.check(model)
        self.engine, _ = self.backend.prepare(model, None, self.cfg.train.build_optimizer)
        self.model = self.backend.unwrap(self.engine)
        self.streams = {"retain": self.task.train_stream(target)}
        self.tracker = self.session.tracker(stage, f"-{target}")
        self.history: list[dict] = []
        self.losses: dict[str, list[float]] = {}
        self.ckpt = self.session.checkpoints(
            stage,
            self.engine,
            self.model,
            self.streams,
            lambda: {"history": self.history, "losses": self.losses},
            name=f"checkpoints/{target}",
        )

    def restore(self) -> None:
        client = (
            self.ckpt.restore() if self.session.resume else None
        )  # None also when this target had not begun
        if client is not None:
            self.history += client["history"]
            self.losses.update(client["losses"])

    def train(self) -> None:
        t_loop = time.perf_counter()
        self.ckpt.run(Erm(self.cfg.train), None, self.streams, self.task.forward, epochs=self.cfg.train.epochs,
                      on_step=self._on_step, on_epoch_end=self._on_epoch_end)  # fmt: skip
        self.loop_seconds = time.perf_counter() - t_loop
        first = (
            self.ckpt.start["epoch"] if self.ckpt.start else 1
        )  # evaluations before a resume were not here
        self.train_seconds = self.loop_seconds - sum(
            r["eval_seconds"] for r in self.history if r["epoch"] >= first
        )

    def _on_step(self, epoch: int, phase: str, step: int, value: float) -> None:
        self.losses.setdefault(phase, []).append(value)

    def _on_epoch_end(self, epoch: int, epoch_losses: dict[str, float]) -> None:
        row = {"epoch": epoch}
        if self.cfg.eval.every_epoch:
            row = self.task.history_row(self.model, self.backend.device, epoch, self.cfg.train.lr_at(epoch),
                                        epoch_losses)  # fmt: skip
            self.history.append(row)
            self.tracker.log({k: v for k, v in row.items() if v is not None}, step=epoch)
        self.ckpt.end_of_epoch(epoch)
        loss = epoch_losses.get("min", float("nan"))
        self.log(f"{self.target} epoch {epoch}: loss {loss:.4f} {self.task.describe(row)}")

    def finish(self, out: Path) -> None:
        cfg, task, backend, target = self.cfg, self.task, self.backend, self.target
        self.tracker.finish()
        settings = {**cfg.train.model_dump(mode="json"), "trained_on": task.trained_on[target]}
        title = f"{target.capitalize()} model ({cfg.model.arch or cfg.model.path})"
        weights = backend.full_state_dict(self.engine)  # collective under ZeRO-3
        memory = backend.memory_report()
        metrics = task.evaluate(self.model, backend.device, self.reference, backend=backend)
        if self.session.is_main:
            task.save(self.model, out, title, settings, metrics, weights, {"target": target},
                      forget=target != "original")  # fmt: skip
            task.keep_scores(out, metrics, self.reference)  # a later run scoring this model reads them
        if target == task.reference_target:
            self.reference = metrics
        self.log(f"{target}: {task.describe(metrics)} ({self.train_seconds:.1f} s training)")
        self.session.report(out, {
            "title": title, "task": task.name, "suite": task.suite, "command": "train", "method": settings,
            "forget": task.forget_summary(), "metrics": metrics, "history": self.history, "losses": self.losses,
            "seconds": time.perf_counter() - self.t0, "loop_seconds": self.loop_seconds,
            "train_seconds": self.train_seconds, "resume": self.ckpt.report(), "memory": memory,
            "artifacts": {"model": "."},
        })  # fmt: skip
        if self.session.is_main:
            self.ckpt.remove()
