"""`unlearn train | run | eval` for causal language models on TOFU (``task: tofu``).

- train: fine-tune ``model.path`` on TOFU ``full`` (the "original", which memorises the fictitious
  authors) and, with the same recipe and seed, on the retain set alone (the "retain" model: the
  reference of forget quality). The retain model is evaluated first so the original's forget quality
  and privleak can be measured against it.
- run: unlearn the forget authors from ``model.path`` with any registered method (SCRUB, GradAscent,
  GradDiff, NPO) through the one loop; TOFU evaluation of the original and of the result against
  ``eval.reference`` (the retain model); SCRUB+R as for classifiers, with answer NLL standing in for
  error (target = the final model's NLL on the holdout authors, who were never trained on).
- eval: score a checkpoint.

A TOFU evaluation of a model is cached in its folder (``tofu_eval.json``, keyed by the evaluation
settings), so the retain model and the original are scored once, not once per method.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine import faults
from engine.backends import build_backend
from engine.checkpoint.export import check_output_dir, model_card, save_checkpoint, staged_dir
from engine.checkpoint.receipt import now, write_receipt
from engine.checkpoint.resume import RunCheckpoints, check_resumable
from engine.checkpoint.run_folder import RunFolder
from engine.config import RunConfig, dump_config
from engine.data.text import PairedStream, QAFormatter, TextStream, prepare_tofu
from engine.errors import ConfigError
from engine.eval.report import write_text_atomic
from engine.eval.tofu import evaluate_tofu
from engine.eval.tofu_report import write_tofu_report
from engine.methods import Erm, build_method
from engine.methods.scrub import select_rewind_epoch
from engine.models.causal_lm import check_vocab, load_causal_lm, load_tokenizer, set_dropout, token_logits
from engine.recipes.common import cpu_state, main_log, seed_everything
from engine.tracking import Tracker

CACHE = "tofu_eval.json"
HEADLINE = ("forget_quality", "model_utility", "forget_Q_A_ROUGE", "forget_Q_A_Prob", "privleak")


def describe(m: dict) -> str:
    return "  ".join(f"{k}={m[k]:.4g}" for k in HEADLINE if isinstance(m.get(k), (int, float)))


class TofuSetup:
    """Tokenizer, data and streams of one run, shared by the three commands."""

    def __init__(self, cfg: RunConfig, path: str):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(path, cfg.model.revision, cfg.model.trust_remote_code)
        self.formatter = QAFormatter(self.tokenizer, cfg.tofu.max_length, cfg.tofu.chat_template)
        self.data = prepare_tofu(cfg.tofu)
        pad = self.tokenizer.pad_token_id
        self.streams = {
            "forget": TextStream(self.data.forget, self.formatter, pad),
            "retain": TextStream(self.data.retain, self.formatter, pad),
            "full": TextStream(self.data.full, self.formatter, pad),
            "holdout": TextStream(self.data.holdout, self.formatter, pad),
            # the per-epoch retain NLL is measured on a probe as large as the forget set (it is a trend, not
            # a metric; the full retain set would cost more than the epoch on a CPU)
            "retain_probe": TextStream(
                self.data.retain[: max(len(self.data.forget), 40)], self.formatter, pad
            ),
        }
        self.streams["paired"] = PairedStream(self.streams["forget"], self.streams["retain"])

    def eval_settings(self) -> dict:
        t = self.cfg.tofu
        return {
            "forget_split": t.forget_split,
            "num_authors": t.num_authors,
            "max_length": t.max_length,
            "chat_template": t.chat_template,
            "utility_examples": t.utility_examples,
            "max_new_tokens": t.max_new_tokens,
        }

    def evaluate(
        self, model, device, reference: dict | None = None, cache_dir: str | Path | None = None, backend=None
    ):
        """TOFU metrics of ``model`` (a model, or a function that loads it: called only when the cache
        misses). Read from / written to ``cache_dir/tofu_eval.json`` when given; a cached result counts
        only if it was computed with the same settings and against the same reference. With several
        processes every one evaluates (ZeRO-3 forwards are collective) and the main one writes."""
        settings = {**self.eval_settings(), "reference": _fingerprint(reference)}
        cache = Path(cache_dir) / CACHE if cache_dir else None
        hit = None
        if cache is not None and cache.is_file():
            stored = json.loads(cache.read_text())
            hit = stored["metrics"] if stored.get("settings") == settings else None
        if backend is not None:
            hit = backend.broadcast_object(hit)  # the main rank decides: all ranks evaluate, or none
        if hit is not None:
            return hit
        if not isinstance(model, torch.nn.Module):
            model = model()
        metrics = evaluate_tofu(
            model.to(device),
            self.tokenizer,
            self.formatter,
            self.data,
            batch_size=self.cfg.eval.batch_size,
            max_new_tokens=self.cfg.tofu.max_new_tokens,
            device=device,
            reference=reference,
            progress=self.cfg.logging.progress,
        )
        if backend is not None:
            backend.barrier()  # nobody writes the cache before every process has decided hit or miss
        if cache is not None and cache.parent.is_dir() and (backend is None or backend.is_main):
            record = {"settings": settings, "metrics": metrics}
            write_text_atomic(cache, json.dumps(record, default=float) + "\n")
        return metrics


def token_rows(cfg: RunConfig) -> tuple[QAFormatter, dict[str, list[dict]]]:
    """The formatter and the forget and retain rows that a Ray driver tokenizes once, into the token stores
    its workers read (engine/launchers/ray_train.py)."""
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code)
    data = prepare_tofu(cfg.tofu)
    return QAFormatter(tokenizer, cfg.tofu.max_length, cfg.tofu.chat_template), {
        "forget": data.forget,
        "retain": data.retain,
    }


def _fingerprint(reference: dict | None) -> str | None:
    """What forget quality and privleak depend on in a reference evaluation, hashed."""
    if reference is None:
        return None
    keyed = {"tr": reference["per_example"]["forget_truth_ratio_by_id"], "auc": reference["mia_min_k"]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=float).encode()).hexdigest()


@torch.no_grad()
def answer_nll(model, stream: TextStream, batch_size: int, device) -> float:
    """Mean next-token NLL over every answer token of ``stream`` (the cheap per-epoch measure)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(stream), batch_size):
        batch = stream.get(torch.arange(start, min(start + batch_size, len(stream))))
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = token_logits(model, batch)
        total += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
        count += int(batch["labels"].numel())
    return total / max(count, 1)


def _history_row(setup: TofuSetup, model, device, epoch: int, losses: dict) -> dict:
    t = time.perf_counter()
    bs = setup.cfg.eval.batch_size
    row = {
        "epoch": epoch,
        "forget_nll": answer_nll(model, setup.streams["forget"], bs, device),
        "holdout_nll": answer_nll(model, setup.streams["holdout"], bs, device),
        "retain_nll": answer_nll(model, setup.streams["retain_probe"], bs, device),
        **{f"{k}_loss": v for k, v in losses.items()},
    }
    row["eval_seconds"] = time.perf_counter() - t
    return row


def _save(
    model,
    tokenizer,
    path: Path,
    title: str,
    base: str,
    setup: TofuSetup,
    settings: dict,
    metrics,
    weights=None,
):
    summary = setup.data.forget_summary()
    headline = {k: metrics.get(k) for k in HEADLINE}
    card = model_card(
        title, base, summary, settings, headline, "TOFU metrics (open-unlearning's definitions)"
    )
    record = {"forget": summary, "method": settings, "metrics": metrics}
    save_checkpoint(model, path, tokenizer, card, record, state_dict=weights)


def run_tofu_training(cfg: RunConfig, targets: tuple[str, ...] = ("retain", "original"), log=print) -> Path:
    if cfg.model.path is None:
        raise ConfigError("`unlearn train` with task=tofu needs model.path: the causal LM to fine-tune")
    unknown = [t for t in targets if t not in ("retain", "original")]
    if unknown:
        raise ConfigError(f"unknown train targets {unknown}; with task=tofu choose from retain, original")
    check_output_dir(cfg.output_dir, cfg.overwrite)
    order = [t for t in ("retain", "original") if t in targets]  # retain first: it is the reference
    partial_dir = RunFolder.of(cfg.output_dir).partial
    resume = check_resumable(partial_dir, cfg, tuple(f"checkpoints/{t}" for t in order),
                             finished=tuple(f"{t}/report.json" for t in order))  # fmt: skip
    backend = build_backend(cfg.backend)
    log = main_log(log, backend)
    setup = TofuSetup(cfg, cfg.model.path)
    log(f"{setup.data.description}")
    reference = None
    with staged_dir(cfg.output_dir, cfg.overwrite, backend, resume=resume) as stage:
        if backend.is_main:
            dump_config(cfg, stage / "config.yaml")
        for target in order:
            finished = stage / target / "report.json"  # written last
            if backend.broadcast_object(finished.is_file()):
                log(f"{target}: finished before the interruption, kept ({stage / target})")
                if target == "retain":  # the reference of the original's evaluation, from its cache
                    reference = json.loads((stage / target / CACHE).read_text())["metrics"]
                continue
            t0 = time.perf_counter()
            seed_everything(cfg.seed)  # same seed for both: the only difference is the data
            with backend.init_context():
                model = load_causal_lm(
                    cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code, cfg.model.dtype
                )
            check_vocab(model, setup.tokenizer, cfg.model.path)
            engine, _ = backend.prepare(model, None, cfg.train.build_optimizer)
            model = backend.unwrap(engine)
            streams = {"retain": setup.streams["full" if target == "original" else "retain"]}
            history, losses = [], {}
            ckpt = RunCheckpoints(
                stage, cfg, backend, engine, model, streams, log=log, name=f"checkpoints/{target}",
                client_state=lambda history=history, losses=losses: {"history": history, "losses": losses},
            )  # fmt: skip
            client = ckpt.restore() if resume else None  # None also when this target had not begun
            history += client["history"] if client else [_history_row(setup, model, backend.device, 0, {})]
            losses.update(client["losses"] if client else {})

            def on_step(epoch, phase, step, value, losses=losses):
                losses.setdefault(phase, []).append(value)

            def on_epoch_end(epoch, epoch_losses, model=model, target=target, history=history, ckpt=ckpt):
                if cfg.eval.every_epoch:
                    history.append(_history_row(setup, model, backend.device, epoch, epoch_losses))
                ckpt.end_of_epoch(epoch)
                log(f"{target} epoch {epoch}: {history[-1]}")

            t_loop = time.perf_counter()
            ckpt.run(Erm(cfg.train), None, streams, token_logits, epochs=cfg.train.epochs, on_step=on_step,
                     on_epoch_end=on_epoch_end)  # fmt: skip
            loop_seconds = time.perf_counter() - t_loop
            # evaluations before a resume were not in this loop
            first = ckpt.start["epoch"] if ckpt.start else 1
            train_seconds = loop_seconds - sum(r["eval_seconds"] for r in history[1:] if r["epoch"] >= first)
            out = stage / target
            settings = {
                **cfg.train.model_dump(mode="json"),
                "trained_on": "TOFU full (forget + retain)" if target == "original" else "TOFU retain only",
            }
            weights = backend.full_state_dict(engine)  # collective under ZeRO-3
            if backend.is_main:
                title = f"TOFU {target} model"
                _save(model, setup.tokenizer, out, title, cfg.model.path, setup, settings, {}, weights)
            memory = backend.memory_report()
            metrics = setup.evaluate(model, backend.device, reference, cache_dir=out, backend=backend)
            if target == "retain":
                reference = metrics
            log(f"{target}: {describe(metrics)} ({train_seconds:.0f}s training)")
            if not backend.is_main:
                continue
            write_tofu_report(
                out,
                {
                    "title": f"TOFU {target} model",
                    "command": "train",
                    "method": settings,
                    "forget": setup.data.forget_summary(),
                    "metrics": metrics,
                    "history": history,
                    "losses": losses,
                    "seconds": time.perf_counter() - t0,
                    "train_seconds": train_seconds,
                    "resume": ckpt.report(),
                    "memory": memory,
                },
            )
            ckpt.remove()
    log(f"done: {', '.join(str(Path(cfg.output_dir) / t) for t in order)}")
    backend.close()
    return Path(cfg.output_dir)


def run_tofu_unlearning(
    cfg: RunConfig,
    log=print,
    backend=None,
    streams: dict | None = None,
    on_checkpoint=None,
    launched_at: float | None = None,
    expect_resume: bool = False,
    stop_file: Path | None = None,
) -> Path:
    """Unlearn under any backend. Every process runs this function; only the main one logs and writes
    results, all of them take part in forwards (ZeRO-3 gathers weights collectively) and checkpoints.
    Each epoch ends with a resumable checkpoint in ``OUTPUT.partial/checkpoints``; started again with
    the same config and output_dir, a run resumes after the last complete one.

    The Ray backend calls this in each worker with its DeepSpeed ``backend``, Ray Data ``streams``,
    ``on_checkpoint(epoch, folder, history_row)`` (ray.train.report), the driver's ``launched_at`` and
    ``expect_resume`` (Ray Train restarted the workers after a failure: a checkpoint must exist) and
    ``stop_file`` (the driver creates it when it is asked to stop: engine/checkpoint/signals.py)."""
    t_start = time.perf_counter()
    started_at = now()
    launched_at = launched_at or time.time()
    if cfg.model.path is None:
        raise ConfigError(
            "`unlearn run` needs model.path: the causal LM to unlearn (e.g. runs/tofu/original)"
        )
    check_output_dir(cfg.output_dir, cfg.overwrite)
    partial_dir = RunFolder.of(cfg.output_dir).partial
    # before any work: another run's checkpoint is refused
    resume = check_resumable(partial_dir, cfg, expected=expect_resume)
    seed_everything(cfg.seed)
    backend = backend or build_backend(cfg.backend)
    log = main_log(log, backend)
    rewind = bool(getattr(cfg.method, "rewind", False))
    if rewind and not cfg.eval.every_epoch:
        raise ConfigError("SCRUB+R (method.rewind=true) needs eval.every_epoch=true")
    if rewind and backend.zero_stage == 3:
        raise ConfigError(
            "SCRUB+R (method.rewind=true) keeps whole-model snapshots per epoch, which ZeRO-3 shards: use "
            "backend.zero_stage=2 (or 0/1), where every rank holds the whole model and the main one snapshots"
        )
    setup = TofuSetup(cfg, cfg.model.path)
    log(setup.data.description)
    device = backend.device
    method = build_method(cfg.method)
    load = partial(load_causal_lm, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
                   dtype=cfg.model.dtype)  # fmt: skip
    with backend.init_context():  # under ZeRO-3 each model is partitioned while it loads
        student = load(cfg.model.path)
        teacher = load(cfg.model.path) if method.needs_teacher else None  # frozen by backend.prepare
    check_vocab(student, setup.tokenizer, cfg.model.path)
    dropout = getattr(cfg.method, "student_dropout", None)
    if dropout is not None:
        set_dropout(student, dropout)  # the teacher stays in eval mode: no dropout there
    student, teacher = backend.prepare(student, teacher, cfg.method.build_optimizer)
    model = backend.unwrap(student)  # the Hugging Face module, for evaluation and export
    teacher_before = backend.fingerprint(teacher) if teacher is not None else None

    def load_reference():
        with backend.init_context():
            return backend.unwrap(backend.prepare_frozen(load(cfg.eval.reference)))

    reference = None
    if cfg.eval.reference:
        reference = setup.evaluate(load_reference, device, cache_dir=cfg.eval.reference, backend=backend)
    original = setup.evaluate(model, device, reference, cache_dir=cfg.model.path, backend=backend)
    log(f"original: {describe(original)}")

    with staged_dir(cfg.output_dir, cfg.overwrite, backend, resume=resume) as stage:
        if backend.is_main:
            dump_config(cfg, stage / "config.yaml")
        tracker = Tracker(
            cfg.logging if backend.is_main else cfg.logging.model_copy(update={"wandb": False}),
            stage, name=Path(cfg.output_dir).name, config=cfg.model_dump(mode="json"),
        )  # fmt: skip
        history, losses = [], {}
        ckpt = RunCheckpoints(
            stage, cfg, backend, student, model, setup.streams, log=log,
            client_state=lambda: {"history": history, "losses": losses, "seen": backend.gather_object(backend.seen)},
        )  # fmt: skip
        client = ckpt.restore() if resume else None
        start = ckpt.start
        if client is not None:
            history, losses = client["history"], client["losses"]
            seen = client["seen"][backend.rank] if backend.rank < len(client["seen"]) else {}
            backend.seen.update({k: {int(e): rows for e, rows in v.items()} for k, v in seen.items()})
        else:
            history.append(_history_row(setup, model, device, 0, {}))
        snapshots = stage / "epochs"
        snapshot = rewind and backend.is_main  # every rank holds the same whole model (ZeRO 0-2)
        if snapshot and client is None:  # a resumed run keeps the snapshots it made before
            snapshots.mkdir(exist_ok=True)
            save_file(cpu_state(model), snapshots / "epoch_0.safetensors")

        first_step = []

        def on_step(epoch: int, phase: str, step: int, value: float) -> None:
            losses.setdefault(phase, []).append(value)
            if not first_step:
                first_step.append(time.time())
                log(f"first step done {first_step[0] - launched_at:.1f} s after launch")

        def on_epoch_end(epoch: int, epoch_losses: dict[str, float]) -> None:
            if cfg.eval.every_epoch or epoch == cfg.method.epochs:
                history.append(_history_row(setup, model, device, epoch, epoch_losses))
                tracker.log({k: v for k, v in history[-1].items() if v is not None}, step=epoch)
                log(f"epoch {epoch}: {history[-1]}")
            if snapshot:
                save_file(cpu_state(model), snapshots / f"epoch_{epoch}.safetensors")
            ckpt.end_of_epoch(epoch)
            if on_checkpoint is not None:
                on_checkpoint(epoch, ckpt.folder, history[-1])
            faults.inject("after_checkpoint", epoch, backend.rank)

        t_loop = time.perf_counter()
        ckpt.run(
            method, teacher, {**setup.streams, **(streams or {})},  # training rows from Ray Data under Ray
            token_logits, epochs=cfg.method.epochs, on_step=on_step, on_epoch_end=on_epoch_end, stop_file=stop_file,
        )  # fmt: skip
        loop_seconds = time.perf_counter() - t_loop
        first = start["epoch"] if start else 1
        train_seconds = loop_seconds - sum(r["eval_seconds"] for r in history[1:] if r["epoch"] >= first)
        memory = backend.memory_report()
        teacher_check = None
        if teacher is not None:
            after = backend.fingerprint(teacher)
            teacher_check = {
                "sha256_before": teacher_before,
                "sha256_after": after,
                "unchanged": after == teacher_before,
            }
            if not teacher_check["unchanged"]:
                log(
                    "WARNING: the frozen teacher's weights changed during the run; this is a bug, please report it"
                )
        for row in memory:
            log("memory rank {rank}: peak {peak_bytes:,} B ({peak_kind}); parameters {parameter_bytes:,} B, "
                "gradients {gradient_bytes:,} B, optimizer state {optimizer_bytes:,} B".format(**row))  # fmt: skip
        shards = backend.gather_object(backend.seen)
        final = setup.evaluate(model, device, reference, backend=backend)
        log(f"{cfg.method.name}: {describe(final)}")
        settings = cfg.method.model_dump(mode="json")
        title = f"{cfg.method.name} unlearning: {setup.data.description}"
        weights = backend.full_state_dict(student)  # collective under ZeRO-3
        artifacts = {"model": "model", "config": "config.yaml"}

        rewound = None
        if snapshot:  # in the main process only (the evaluation of a plain copy has no collectives)
            # SCRUB+R with NLL for error: target = the final model's answer NLL on the holdout authors
            # (a forget-validation set: same distribution, never trained on); pick the epoch whose
            # forget-set NLL is closest (ties: earliest).
            errors = [row["forget_nll"] for row in history]
            target = history[-1]["holdout_nll"]
            j = select_rewind_epoch(errors, target)
            chosen = copy.deepcopy(model)
            chosen.load_state_dict(load_file(snapshots / f"epoch_{j}.safetensors"))
            rewound_metrics = setup.evaluate(chosen, device, reference)
            rewound = {"epoch": j, "target_nll": target, "forget_nlls": errors, "metrics": rewound_metrics}
            rsettings = {**settings, "rewound_to_epoch": j}
            _save(
                chosen, setup.tokenizer, stage / "model_rewound", f"SCRUB+R (epoch {j})", cfg.model.path,
                setup, rsettings, rewound_metrics,
            )  # fmt: skip
            artifacts["model_rewound"] = "model_rewound"
            log(f"SCRUB+R: target NLL {target:.3f} -> epoch {j}: {describe(rewound_metrics)}")
            shutil.rmtree(snapshots)
        tracker.finish()
        if backend.is_main:
            _save(
                model,
                setup.tokenizer,
                stage / "model",
                title,
                cfg.model.path,
                setup,
                settings,
                final,
                weights,
            )
            ids = {name: [int(r["id"]) for r in rows] for name, rows in
                   (("forget", setup.data.forget), ("retain", setup.data.retain))}  # fmt: skip
            write_text_atomic(stage / "shards.json", json.dumps(_shard_ids(shards, ids)) + "\n")
            write_receipt(
                stage, forget=setup.data.forget_summary(), input_model=cfg.model.path, revision=cfg.model.revision,
                outputs={k: v for k, v in artifacts.items() if k.startswith("model")}, method=settings,
                metrics=final, started_at=started_at,
            )  # fmt: skip
            ckpt.remove()  # the run is complete: the exported model is the result
            write_tofu_report(
                stage,
                {
                    "title": title,
                    "command": "run",
                    "method": settings,
                    "forget": setup.data.forget_summary(),
                    "metrics": final,
                    "original": original,
                    "reference": reference,
                    "rewound": rewound,
                    "history": history,
                    "losses": losses,
                    "seconds": time.perf_counter() - t_start,
                    "loop_seconds": loop_seconds,
                    "train_seconds": train_seconds,
                    "resumed_from_epoch": start["epoch"] - 1 if start else None,
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
                    "teacher": teacher_check,
                    "artifacts": artifacts,
                },
            )
    out = Path(cfg.output_dir)
    log(f"done: model in {out / 'model'}, report in {out / 'report.md'}")
    backend.close()
    return out


def _shard_ids(shards: list[dict], ids: dict[str, list[int]]) -> dict:
    """stream -> epoch -> rank -> the example ids that rank trained on (ids, never content)."""
    out: dict = {}
    for rank, seen in enumerate(shards):
        for stream, epochs in seen.items():
            table = ids.get(stream)
            for epoch, rows in epochs.items():
                slot = out.setdefault(stream, {}).setdefault(str(epoch), {})
                slot[str(rank)] = [table[r] for r in rows] if table else rows
    return out


def run_tofu_eval(cfg: RunConfig, log=print, backend=None) -> Path:
    """Score ``model.path`` under any backend: every process evaluates (ZeRO-3 forwards are collective), the
    main one writes the report."""
    if cfg.model.path is None:
        raise ConfigError("`unlearn eval` needs model.path: the checkpoint to score")
    check_output_dir(cfg.output_dir, cfg.overwrite)
    backend = backend or build_backend(cfg.backend)
    log = main_log(log, backend)
    setup = TofuSetup(cfg, cfg.model.path)

    def load(path: str, revision=None, trust_remote_code=False):
        with backend.init_context():  # under ZeRO-3 partitioned while it loads
            model = load_causal_lm(path, revision, trust_remote_code, cfg.model.dtype)
        return backend.unwrap(backend.prepare_frozen(model))

    reference = None
    if cfg.eval.reference:
        reference = setup.evaluate(
            partial(load, cfg.eval.reference), backend.device, cache_dir=cfg.eval.reference, backend=backend
        )
    model = load(cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code)
    check_vocab(model, setup.tokenizer, cfg.model.path)
    metrics = setup.evaluate(model, backend.device, reference, backend=backend)
    log(describe(metrics))
    with staged_dir(cfg.output_dir, cfg.overwrite, backend) as stage:
        if backend.is_main:
            dump_config(cfg, stage / "config.yaml")
            write_tofu_report(
                stage,
                {
                    "title": f"TOFU evaluation of {cfg.model.path}",
                    "command": "eval",
                    "forget": setup.data.forget_summary(),
                    "metrics": metrics,
                    "reference": reference,
                },
            )
    backend.close()
    return Path(cfg.output_dir)
