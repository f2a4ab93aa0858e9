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
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.backends import build_backend
from engine.checkpoint.export import check_output_dir, model_card, save_checkpoint, staged_dir
from engine.config import RunConfig, dump_config
from engine.data.text import PairedStream, QAFormatter, TextStream, prepare_tofu
from engine.errors import ConfigError
from engine.eval.report import write_text_atomic
from engine.eval.tofu import evaluate_tofu
from engine.eval.tofu_report import write_tofu_report
from engine.loop import LoopHooks, run_loop
from engine.methods import Erm, build_method
from engine.methods.scrub import select_rewind_epoch
from engine.models.causal_lm import check_vocab, load_causal_lm, load_tokenizer, set_dropout, token_logits
from engine.recipes.common import cpu_state, seed_everything
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

    def evaluate(self, model, device, reference: dict | None = None, cache_dir: str | Path | None = None):
        """TOFU metrics of ``model`` (a model, or a function that loads it: called only when the cache
        misses). Read from / written to ``cache_dir/tofu_eval.json`` when given; a cached result counts
        only if it was computed with the same settings and against the same reference."""
        settings = {**self.eval_settings(), "reference": _fingerprint(reference)}
        cache = Path(cache_dir) / CACHE if cache_dir else None
        if cache is not None and cache.is_file():
            stored = json.loads(cache.read_text())
            if stored.get("settings") == settings:
                return stored["metrics"]
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
        if cache is not None and cache.parent.is_dir():
            record = {"settings": settings, "metrics": metrics}
            write_text_atomic(cache, json.dumps(record, default=float) + "\n")
        return metrics


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


def _save(model, tokenizer, path: Path, title: str, base: str, setup: TofuSetup, settings: dict, metrics):
    summary = setup.data.forget_summary()
    headline = {k: metrics.get(k) for k in HEADLINE}
    card = model_card(
        title, base, summary, settings, headline, "TOFU metrics (open-unlearning's definitions)"
    )
    save_checkpoint(model, path, tokenizer, card, {"forget": summary, "method": settings, "metrics": metrics})


def run_tofu_training(cfg: RunConfig, targets: tuple[str, ...] = ("retain", "original"), log=print) -> Path:
    if cfg.model.path is None:
        raise ConfigError("`unlearn train` with task=tofu needs model.path: the causal LM to fine-tune")
    unknown = [t for t in targets if t not in ("retain", "original")]
    if unknown:
        raise ConfigError(f"unknown train targets {unknown}; with task=tofu choose from retain, original")
    check_output_dir(cfg.output_dir, cfg.overwrite)
    backend = build_backend(cfg.backend)
    setup = TofuSetup(cfg, cfg.model.path)
    log(f"{setup.data.description}")
    order = [t for t in ("retain", "original") if t in targets]  # retain first: it is the reference
    reference = None
    with staged_dir(cfg.output_dir, cfg.overwrite) as stage:
        dump_config(cfg, stage / "config.yaml")
        for target in order:
            t0 = time.perf_counter()
            seed_everything(cfg.seed)  # same seed for both: the only difference is the data
            model = load_causal_lm(
                cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code, cfg.model.dtype
            )
            check_vocab(model, setup.tokenizer, cfg.model.path)
            model, _ = backend.prepare(model, None, cfg.train.build_optimizer)
            streams = {"retain": setup.streams["full" if target == "original" else "retain"]}
            history = [_history_row(setup, model, backend.device, 0, {})]

            def on_epoch_end(epoch, losses, model=model, target=target, history=history):
                if cfg.eval.every_epoch:
                    history.append(_history_row(setup, model, backend.device, epoch, losses))
                log(f"{target} epoch {epoch}: {history[-1]}")

            t_loop = time.perf_counter()
            state = run_loop(
                Erm(cfg.train),
                backend,
                model,
                None,
                streams,
                token_logits,
                seed=cfg.seed,
                epochs=cfg.train.epochs,
                hooks=LoopHooks(on_epoch_end=on_epoch_end),
                progress=cfg.logging.progress,
            )
            loop_seconds = time.perf_counter() - t_loop
            train_seconds = loop_seconds - sum(r["eval_seconds"] for r in history[1:])
            out = stage / target
            settings = {
                **cfg.train.model_dump(mode="json"),
                "trained_on": "TOFU full (forget + retain)" if target == "original" else "TOFU retain only",
            }
            _save(model, setup.tokenizer, out, f"TOFU {target} model", cfg.model.path, setup, settings, {})
            metrics = setup.evaluate(model, backend.device, reference, cache_dir=out)
            if target == "retain":
                reference = metrics
            log(f"{target}: {describe(metrics)} ({train_seconds:.0f}s training)")
            write_tofu_report(
                out,
                {
                    "title": f"TOFU {target} model",
                    "command": "train",
                    "method": settings,
                    "forget": setup.data.forget_summary(),
                    "metrics": metrics,
                    "history": history,
                    "losses": state.losses,
                    "seconds": time.perf_counter() - t0,
                    "train_seconds": train_seconds,
                },
            )
    log(f"done: {', '.join(str(Path(cfg.output_dir) / t) for t in order)}")
    return Path(cfg.output_dir)


def run_tofu_unlearning(cfg: RunConfig, log=print) -> Path:
    t_start = time.perf_counter()
    if cfg.model.path is None:
        raise ConfigError(
            "`unlearn run` needs model.path: the causal LM to unlearn (e.g. runs/tofu/original)"
        )
    check_output_dir(cfg.output_dir, cfg.overwrite)
    seed_everything(cfg.seed)
    backend = build_backend(cfg.backend)
    setup = TofuSetup(cfg, cfg.model.path)
    log(setup.data.description)
    device = backend.device
    student = load_causal_lm(cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code, cfg.model.dtype)
    check_vocab(student, setup.tokenizer, cfg.model.path)
    reference = None
    if cfg.eval.reference:
        load_reference = partial(load_causal_lm, cfg.eval.reference, dtype=cfg.model.dtype)
        reference = setup.evaluate(load_reference, device, cache_dir=cfg.eval.reference)
    original = setup.evaluate(student, device, reference, cache_dir=cfg.model.path)
    log(f"original: {describe(original)}")

    method = build_method(cfg.method)
    teacher = copy.deepcopy(student) if method.needs_teacher else None  # frozen by backend.prepare
    dropout = getattr(cfg.method, "student_dropout", None)
    if dropout is not None:
        set_dropout(student, dropout)  # the teacher stays in eval mode: no dropout there
    student, teacher = backend.prepare(student, teacher, cfg.method.build_optimizer)

    with staged_dir(cfg.output_dir, cfg.overwrite) as stage:
        dump_config(cfg, stage / "config.yaml")
        tracker = Tracker(
            cfg.logging, stage, name=Path(cfg.output_dir).name, config=cfg.model_dump(mode="json")
        )
        history = [_history_row(setup, student, device, 0, {})]
        rewind = bool(getattr(cfg.method, "rewind", False))
        snapshots = stage / "epochs"
        if rewind:
            snapshots.mkdir()
            save_file(cpu_state(student), snapshots / "epoch_0.safetensors")

        if rewind and not cfg.eval.every_epoch:
            raise ConfigError("SCRUB+R (method.rewind=true) needs eval.every_epoch=true")

        def on_epoch_end(epoch: int, losses: dict[str, float]) -> None:
            if not cfg.eval.every_epoch and epoch < cfg.method.epochs:
                return  # only the last epoch is measured
            history.append(_history_row(setup, student, device, epoch, losses))
            tracker.log({k: v for k, v in history[-1].items() if v is not None}, step=epoch)
            if rewind:
                save_file(cpu_state(student), snapshots / f"epoch_{epoch}.safetensors")
            log(f"epoch {epoch}: {history[-1]}")

        t_loop = time.perf_counter()
        state = run_loop(
            method,
            backend,
            student,
            teacher,
            setup.streams,
            token_logits,
            seed=cfg.seed,
            epochs=cfg.method.epochs,
            hooks=LoopHooks(on_epoch_end=on_epoch_end),
            progress=cfg.logging.progress,
        )
        loop_seconds = time.perf_counter() - t_loop
        train_seconds = loop_seconds - sum(r["eval_seconds"] for r in history[1:])
        final = setup.evaluate(student, device, reference)
        log(f"{cfg.method.name}: {describe(final)}")
        settings = cfg.method.model_dump(mode="json")
        title = f"{cfg.method.name} unlearning: {setup.data.description}"
        _save(student, setup.tokenizer, stage / "model", title, cfg.model.path, setup, settings, final)
        artifacts = {"model": "model", "config": "config.yaml"}

        rewound = None
        if rewind:
            # SCRUB+R with NLL for error: target = the final model's answer NLL on the holdout authors
            # (a forget-validation set: same distribution, never trained on); pick the epoch whose
            # forget-set NLL is closest (ties: earliest).
            errors = [row["forget_nll"] for row in history]
            target = history[-1]["holdout_nll"]
            j = select_rewind_epoch(errors, target)
            chosen = copy.deepcopy(student)
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
            for f in snapshots.iterdir():
                f.unlink()
            snapshots.rmdir()
        tracker.finish()
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
                "losses": state.losses,
                "seconds": time.perf_counter() - t_start,
                "loop_seconds": loop_seconds,
                "train_seconds": train_seconds,
                "artifacts": artifacts,
            },
        )
    out = Path(cfg.output_dir)
    log(f"done: model in {out / 'model'}, report in {out / 'report.md'}")
    return out


def run_tofu_eval(cfg: RunConfig, log=print) -> Path:
    if cfg.model.path is None:
        raise ConfigError("`unlearn eval` needs model.path: the checkpoint to score")
    check_output_dir(cfg.output_dir, cfg.overwrite)
    backend = build_backend(cfg.backend)
    setup = TofuSetup(cfg, cfg.model.path)
    reference = None
    if cfg.eval.reference:
        load_reference = partial(load_causal_lm, cfg.eval.reference, dtype=cfg.model.dtype)
        reference = setup.evaluate(load_reference, backend.device, cache_dir=cfg.eval.reference)
    model = load_causal_lm(cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code, cfg.model.dtype)
    check_vocab(model, setup.tokenizer, cfg.model.path)
    metrics = setup.evaluate(model, backend.device, reference)
    log(describe(metrics))
    with staged_dir(cfg.output_dir, cfg.overwrite) as stage:
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
    return Path(cfg.output_dir)
