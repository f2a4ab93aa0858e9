"""`unlearn run`: unlearn a checkpoint of any task with any registered method (SCRUB, SCRUB+R, the baselines), on
any backend, in four stages over one session (session.py):

- ``setup``: before the run folder exists (a mistake leaves nothing behind), the task (data, how models load and
  are scored), the student and its frozen teacher (partitioned while they load under ZeRO-3; a LoRA student's
  teacher is its own base weights), the reference's scores; then in the staged folder the streams, the original's
  scores, the method's ``prepare`` and the optimizer the backend builds over what is left trainable;
- ``restore``: the newest checkpoint of an unfinished run of this config, or the history's epoch 0 (the original);
- ``train``: the teacher's outputs computed once where the method allows, then the one loop (engine/loop.py), a
  history row and a resumable checkpoint after each epoch;
- ``finish``: the final scores, the epoch a method may choose to export beside them (SCRUB+R), the model, the
  receipt and the report, written by the main rank.

Every process runs it; only the main one logs and writes results; all evaluate (ZeRO-3 forwards are collective)
and checkpoint. What the method decides as it goes (SCRUB's calibrated schedule, SCRUB+R's choice) it decides in
its own hooks (engine/methods/base.py: Method), on what the ``Probe`` here measures. ``train_seconds`` includes
``prepare_seconds`` (all of Fisher forgetting's cost, Retrain's re-initialisation), so every method's time is its
whole cost.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

from engine import faults, provenance
from engine.artifacts.receipt import now, write_receipt
from engine.config import RunConfig
from engine.data.paired import PairedStream
from engine.io import write_text_atomic
from engine.methods import build_method
from engine.methods.base import Probe
from engine.models.causal_lm import set_dropout
from engine.models.lora import AdapterDisabled, apply_lora, lora_summary
from engine.recipes.session import Session, load_frozen, log_memory, training_seconds
from engine.tasks import build_task
from engine.teacher_cache import fill_teacher_cache, teacher_cache_wanted


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
    """Unlearn ``model.path``. A launcher (Ray Train, engine/launch/ray_train.py) passes its ``backend``,
    ``streams`` that replace the task's forget and retain streams (token stores its driver wrote),
    ``on_checkpoint(epoch, folder, history_row)`` (ray.train.report), its ``launched_at``, ``expect_resume``
    (restarted after a failure: a checkpoint must exist) and ``stop_file`` (its request to checkpoint and stop:
    engine/checkpoint/signals.py). Each epoch ends with a resumable checkpoint in ``OUTPUT.partial/checkpoints``;
    started again with the same config, a run resumes after the last one."""
    recipe = Unlearning(cfg, log, backend, streams, on_checkpoint, launched_at, expect_resume, stop_file)
    return recipe.run()


class Unlearning:
    def __init__(self, cfg: RunConfig, log=print, backend=None, streams=None, on_checkpoint=None,
                 launched_at=None, expect_resume=False, stop_file=None):  # fmt: skip
        self.t_start, self.started_at = time.perf_counter(), now()
        self.launched_at = launched_at or time.time()
        self.session = Session(
            cfg, "run", log, backend, checkpoints=("checkpoints",), expect_resume=expect_resume
        )
        self.cfg, self.backend, self.log = cfg, self.session.backend, self.session.log
        self.given_streams, self.on_checkpoint, self.stop_file = streams, on_checkpoint, stop_file
        self.method = build_method(cfg.method)
        self.history: list[dict] = []
        self.losses: dict[str, list[float]] = {}
        self.first_step: float | None = None

    def run(self) -> Path:
        tokens = None if self.given_streams else self.session.folder.tokens  # a launcher's stores are its own
        self.setup()
        with self.session.stage(scratch=tokens) as stage:
            self.setup_training(stage)
            self.restore()
            self.train()
            self.finish(stage)
        out = self.session.out
        self.log(f"done: model in {out / 'model'}, report in {out / 'report.md'}")
        return self.session.close()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, backend, method, m = self.cfg, self.backend, self.method, self.cfg.model
        self.task = task = build_task(cfg, m.path)
        self.log(task.description)
        self.use_cache = teacher_cache_wanted(method, self.log)
        needs_teacher = (method.needs_teacher and not self.use_cache) or method.needs_teacher_weights
        with backend.init_context():  # under ZeRO-3 each model is partitioned while it loads
            student = task.load(m.path, m.revision, m.trust_remote_code)
            # the teacher: the same checkpoint, loaded again (a copy of a partitioned model would hold no
            # weights); a LoRA student's teacher is its own base weights (below), so nothing is loaded twice
            teacher = (
                task.load(m.path, m.revision, m.trust_remote_code) if needs_teacher and not m.lora else None
            )
        task.check(student)
        method.check_model(student)  # e.g. CF-k's k beyond the model's blocks, before any work
        self.lora = None
        if m.lora is not None:  # only the adapters train; refused here (one line) when no module matches
            student = apply_lora(student, m.lora)
            self.lora = lora_summary(student, m.lora)  # for the record, the receipt and the model card
        if method.student_dropout is not None:
            set_dropout(student, method.student_dropout)  # the teacher stays in eval mode: no dropout there
        self.student, self.teacher, self.needs_teacher = student, teacher, needs_teacher
        self.reference = None
        if cfg.eval.reference:  # loaded only when its cached scores miss
            self.reference = task.evaluate(partial(load_frozen, backend, task, cfg.eval.reference), backend.device,
                                           cache_dir=cfg.eval.reference, backend=backend)  # fmt: skip

    def setup_training(self, stage: Path) -> None:
        cfg, backend, method, task, m = self.cfg, self.backend, self.method, self.task, self.cfg.model
        student, teacher = self.student, self.teacher
        # a launcher's streams replace the task's forget and retain streams (which are then never built); a text
        # task's are tokenized once into OUTPUT.tokens, which every rank reads by row
        self.streams = dict(self.given_streams) if self.given_streams else task.streams(
            augment=method.augment, folder=self.session.folder.tokens, backend=backend
        )  # fmt: skip
        if "paired" in method.needs:
            self.streams["paired"] = PairedStream(self.streams["forget"], self.streams["retain"])
        self.tracker = self.session.tracker(stage)
        self.original = None  # a resumed run has the original's scores in its checkpoint
        if not self.session.resume and method.prepares_student:  # scored before `prepare` changes it
            self.original = task.evaluate(
                student, backend.device, self.reference, cache_dir=m.path, backend=backend
            )
        t_prepare = time.perf_counter()
        if method.prepares_student:  # before backend.prepare: what it freezes stays out of the optimizer
            method.prepare(student, task.method_context(backend))
        self.student, teacher = backend.prepare(student, teacher, cfg.method.build_optimizer)
        self.model = backend.unwrap(self.student)  # the Hugging Face module, for evaluation and export
        if m.lora is not None and self.needs_teacher:
            teacher = AdapterDisabled(
                self.model
            )  # the base weights, adapters disabled: never in the optimizer
        self.teacher = teacher
        self.prepare_seconds = time.perf_counter() - t_prepare
        self.teacher_before = backend.fingerprint(teacher) if teacher is not None else None
        if (
            not self.session.resume and self.original is None
        ):  # ZeRO-3: now that forwards can gather the shards
            self.original = task.evaluate(self.model, backend.device, self.reference, cache_dir=m.path,
                                          backend=backend)  # fmt: skip
        self.probe = Probe(
            forget=lambda: backend.broadcast_object(task.forget_error(self.model, backend.device)),
            calibration=lambda row: backend.broadcast_object(tuple(float(x) for x in task.calibration(row))),
            rewind=task.rewind_series, unit=task.calibration_measure, log=self.log,
        )  # fmt: skip
        self.ckpt = self.session.checkpoints(
            stage,
            self.student,
            self.model,
            self.streams,
            self._client_state,
            keep_all=method.keeps_every_epoch,
        )

    def _client_state(self) -> dict:
        """What a resumed run needs back: the history so far, the losses, the original's scores, the rows each rank
        has trained on, and what the method has decided."""
        return {"history": self.history, "losses": self.losses, "original": self.original,
                "seen": self.backend.gather_object(self.backend.seen), "method": self.method.state_dict()}  # fmt: skip

    # ------------------------------------------------------------------ restore
    def restore(self) -> None:
        client = self.ckpt.restore() if self.session.resume else None
        backend = self.backend
        if client is not None:
            self.history, self.losses, self.original = client["history"], client["losses"], client["original"]
            self.method.load_state_dict(client["method"])  # the decisions taken before the stop
            seen = client["seen"][backend.rank] if backend.rank < len(client["seen"]) else {}
            backend.seen.update({k: {int(e): rows for e, rows in v.items()} for k, v in seen.items()})
        else:
            row = self.task.history_row(self.model, backend.device, 0, None, {}, metrics=self.original)
            row.update(self.method.after_epoch(0, row, self.probe))  # e.g. an original already at its target
            self.history.append(row)
            if self.method.keeps_every_epoch:  # epoch 0 is the original: a checkpoint of the start
                self.ckpt.end_of_epoch(0)
        self.log(f"original: {self.task.describe(self.original)}")

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        cfg, method, backend, m = self.cfg, self.method, self.backend, self.cfg.model
        t_loop = time.perf_counter()
        self.teacher_outputs = None
        if self.use_cache:  # its time is the run's: it replaces every epoch's teacher forwards
            # the student before its first step IS the teacher; a resumed one has moved, so the teacher is loaded
            # for this pass only (a LoRA student's: its base weights)
            source = self.model
            if self.session.resume:
                source = AdapterDisabled(self.model) if m.lora else load_frozen(
                    backend, self.task, m.path, m.revision, m.trust_remote_code)  # fmt: skip
            self.teacher_outputs = fill_teacher_cache(
                source, {n: self.streams[n] for n in sorted(method.streams())}, self.task.forward, backend,
                batch_size=cfg.eval.batch_size, temperature=cfg.method.temperature, topk=cfg.method.teacher_cache_topk,
                budget_bytes=cfg.method.teacher_cache_bytes, progress=cfg.logging.progress,
            )  # fmt: skip
            del source
            self.log(f"teacher outputs cached in {self.teacher_outputs.seconds:.1f} s: " + ", ".join(
                f"{k} {v['kind']} {v['bytes']:,} B" + (f" (tail mass {v['tail_mass_mean']:.2g})" if "topk" in v else "")
                for k, v in self.teacher_outputs.summary()["streams"].items()))  # fmt: skip
        self.ckpt.run(method, self.teacher, self.streams, self.task.forward, epochs=cfg.method.epochs,
                      on_step=self._on_step, on_epoch_end=self._on_epoch_end, stop_file=self.stop_file,
                      teacher_outputs=self.teacher_outputs,
                      end_phase=lambda epoch, phase, step: method.check_in_phase(epoch, phase, step, self.probe))  # fmt: skip
        self.loop_seconds = time.perf_counter() - t_loop + self.prepare_seconds
        first = (
            self.ckpt.start["epoch"] if self.ckpt.start else 1
        )  # evaluations before a resume were not here
        self.train_seconds = self.loop_seconds - sum(
            r["eval_seconds"] for r in self.history if r["epoch"] >= first
        )

    def _on_step(self, epoch: int, phase: str, step: int, value: float) -> None:
        self.losses.setdefault(phase, []).append(value)
        if self.first_step is None:
            self.first_step = time.time()
            self.log(f"first step done {self.first_step - self.launched_at:.1f} s after launch")

    def _on_epoch_end(self, epoch: int, epoch_losses: dict[str, float]) -> None:
        row = {"epoch": epoch}
        if self.cfg.eval.every_epoch:
            row = self.task.history_row(self.model, self.backend.device, epoch, self.cfg.method.lr_at(epoch),
                                        epoch_losses)  # fmt: skip
            row.update(
                self.method.after_epoch(epoch, row, self.probe)
            )  # before the checkpoint, which keeps it
            self.history.append(row)
            self.tracker.log({k: v for k, v in row.items() if v is not None}, step=epoch)
        self.ckpt.end_of_epoch(epoch)
        if self.on_checkpoint is not None:
            self.on_checkpoint(epoch, self.ckpt.folder, row)
        faults.inject("after_checkpoint", epoch, self.backend.rank)
        self.log(f"epoch {epoch}: losses {epoch_losses} {self.task.describe(row)}")

    # ------------------------------------------------------------------ finish
    def finish(self, stage: Path) -> None:
        cfg, task, backend, m = self.cfg, self.task, self.backend, self.cfg.model
        memory = backend.memory_report()
        log_memory(self.log, memory)
        teacher_check = None
        if self.teacher is not None:
            after = backend.fingerprint(self.teacher)
            teacher_check = {"sha256_before": self.teacher_before, "sha256_after": after,
                             "unchanged": after == self.teacher_before}  # fmt: skip
            if not teacher_check["unchanged"]:
                self.log(
                    "WARNING: the frozen teacher's weights changed during the run; this is a bug, please report it"
                )
        shards = backend.gather_object(backend.seen)
        final = task.evaluate(self.model, backend.device, self.reference, backend=backend)
        self.log(f"{cfg.method.name}: {task.describe(final)}")
        settings = cfg.method.model_dump(mode="json")
        title = f"{cfg.method.name} unlearning: {task.forget_summary()['description']}"
        record = {"lora": self.lora} if self.lora else None  # also says which export: merged or adapter
        self._export(stage / "model", title, settings, final, record)
        artifacts = {"model": "model", "config": "config.yaml"}
        rewound = None
        choice = self.method.choose_final(self.history, final, self.probe)
        if choice is not None:  # an earlier epoch exported beside the final model (SCRUB+R)
            epoch, steering = choice
            self.ckpt.store.check(f"epoch_{epoch}")  # verified against its manifest before it is read
            # its weights come back from that epoch's checkpoint on every rank (under ZeRO-3 each its partition)
            backend.load_checkpoint(self.ckpt.folder, f"epoch_{epoch}", self.student, weights_only=False)
            metrics = task.evaluate(self.model, backend.device, self.reference, backend=backend)
            rewound = {"epoch": epoch, **steering, "metrics": metrics}
            self._export(stage / "model_rewound", f"SCRUB+R (epoch {epoch}): {title}",
                         {**settings, "rewound_to_epoch": epoch}, metrics, record)  # fmt: skip
            artifacts["model_rewound"] = "model_rewound"
            self.log(f"epoch {epoch}: {task.describe(metrics)}")
        self.tracker.finish()
        if not self.session.is_main:
            return
        ids = {name: task.row_ids(name) for name in ("forget", "retain")}
        write_text_atomic(stage / "shards.json", json.dumps(_shard_ids(shards, ids)) + "\n")
        write_receipt(
            stage, forget=task.forget_summary(), input_model=m.path, revision=m.revision,
            outputs={k: v for k, v in artifacts.items() if k.startswith("model")}, method=settings, metrics=final,
            started_at=self.started_at, sources=provenance.loaded(), lora=self.lora,
        )  # fmt: skip
        self.ckpt.remove()  # the run is complete: the exported model is the result
        first_step = self.first_step
        self.session.report(stage, {
            "title": title, "task": task.name, "suite": task.suite, "command": "run", "method": settings,
            "forget": task.forget_summary(), "metrics": final, "original": self.original, "reference": self.reference,
            "rewound": rewound, "history": self.history, "losses": self.losses,
            "seconds": time.perf_counter() - self.t_start, "loop_seconds": self.loop_seconds,
            "prepare_seconds": self.prepare_seconds, "train_seconds": self.train_seconds,
            "reference_seconds": training_seconds(cfg.eval.reference),  # Retrain's, for the verdict
            "resumed_from_epoch": self.ckpt.start["epoch"] - 1 if self.ckpt.start else None,
            "resume": self.ckpt.report(),
            "seconds_to_first_step": first_step - self.launched_at if first_step else None,
            "first_step_at": first_step,  # time.time() of the first step
            "memory": memory, "teacher": teacher_check,
            "teacher_cache": self.teacher_outputs.summary() if self.teacher_outputs is not None else None,
            "lora": self.lora, "artifacts": artifacts, **self.method.report(),
        })  # fmt: skip

    def _export(self, path: Path, title: str, settings: dict, metrics: dict, record: dict | None) -> None:
        weights = self.backend.full_state_dict(self.student)  # collective under ZeRO-3
        if self.session.is_main:
            self.task.save(self.model, path, title, settings, metrics, weights, record)


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
