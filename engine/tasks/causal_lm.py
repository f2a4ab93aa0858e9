"""Causal language models: any ``AutoModelForCausalLM`` checkpoint, on any text data.

Rows are raw documents (``data.text_column``: the loss counts every token; a long document is cut into
windows) or prompt/answer pairs (``data.prompt_column`` / ``data.answer_column``: the loss counts answer
tokens only, the prompt through the chat template when the tokenizer has one), from any file or hub id
(engine/data/text.py); the forward returns the logits of the counted tokens (engine/models/causal_lm.py).
Three evaluation suites:

- ``text`` (engine/eval/text.py): per-token NLL of forget, retain and holdout rows, verbatim ROUGE of the
  forget rows, the MIAs forget vs holdout and privleak against the reference (Retrain);
- ``tofu``, the preset (``data.preset=tofu``, the ``tofu`` section): 200 fictitious authors,
  forget01/05/10, open-unlearning's metrics (forget quality against the retain model, model utility, ROUGE,
  truth ratio, the MIAs and privleak; engine/eval/tofu.py).
- ``muse``, the preset (``data.preset=muse``, the ``muse`` section): MUSE-News or MUSE-Books articles as documents,
  the MUSE authors' C1-C4 (verbatim and knowledge ROUGE, privleak; engine/data/muse.py, engine/eval/muse.py).

An evaluation of a model is cached in its folder (``tofu_eval.json`` / ``text_eval.json``, keyed by the
evaluation settings and the reference it was scored against), so the reference and the original are scored
once, not once per method.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from engine.artifacts.export import run_card, save_checkpoint
from engine.config import train_targets
from engine.data.muse import CORPORA as MUSE_CORPORA
from engine.data.muse import prepare_muse
from engine.data.paired import IdkAnswers
from engine.data.store import TokenStore, write_rows
from engine.data.text import DocumentFormatter, QAFormatter, TextStream, prepare_text
from engine.data.tofu import load_idk_answers, prepare_tofu, read_answer_lines
from engine.errors import ConfigError, ModelError, first_line
from engine.eval import registry
from engine.eval.muse import evaluate_muse
from engine.eval.text import evaluate_text
from engine.eval.tofu import evaluate_tofu
from engine.io import write_text_atomic
from engine.methods import METHODS
from engine.models.causal_lm import (
    check_attn_implementation,
    check_vocab,
    load_causal_lm,
    load_tokenizer,
    token_logits,
)
from engine.models.loading import resolve_model
from engine.tasks.base import Task, config_key


def describe(m: dict) -> str:
    return registry.describe(m, "tofu", "text")  # a history row shows the NLLs


@torch.no_grad()
def answer_nll(model, stream: TextStream, batch_size: int, device) -> float | None:
    """Mean next-token NLL over every counted token of ``stream`` (the cheap per-epoch measure); None for an
    empty stream."""
    if len(stream) == 0:
        return None
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(stream), batch_size):
        batch = stream.get(torch.arange(start, min(start + batch_size, len(stream))))
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = token_logits(model, batch)
        total += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
        count += int(batch["labels"].numel())
    return total / max(count, 1)


def _fingerprint(reference: dict | None) -> str | None:
    """What forget quality and privleak depend on in a reference evaluation, hashed."""
    if reference is None:
        return None
    keyed = {
        "tr": reference["per_example"].get("forget_truth_ratio_by_id"),
        "auc": reference.get("mia_min_k"),
    }
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=float).encode()).hexdigest()


class CausalLM(Task):
    name = "causal_lm"
    forward = staticmethod(token_logits)

    @classmethod
    def token_rows(cls, cfg) -> tuple[object, dict[str, list[dict]]]:
        """The formatter and the forget and retain rows that a Ray driver tokenizes once, into the token stores
        its workers read (engine/launch/ray_train.py)."""
        task = cls(cfg, cfg.model.path)
        return task.formatter, {"forget": task.data.forget, "retain": task.data.retain}

    def __init__(self, cfg, model_path: str | None):
        if model_path is None:  # refused before any work by the config's rules (engine/config/rules.py)
            raise ConfigError("task=causal_lm needs model.path: the causal LM (a folder or a hub id)")
        self.cfg = cfg
        self.suite = "tofu" if cfg.data.preset == "tofu" else "muse" if cfg.data.preset == "muse" else "text"
        self.headline = registry.headline(self.suite)
        # `unlearn train`'s models, the reference first (the original's forget quality and privleak are measured
        # against it), with the same recipe and seed: TOFU's retain model, or Retrain
        self.train_targets = train_targets(cfg)
        self.reference_target = self.train_targets[0]
        self.model_path = model_path
        # the model is checked (a readable folder, or a hub id resolved to a commit) before anything is read;
        # the tokenizer and the weights are then read at that same commit
        revision = resolve_model(model_path, cfg.model.revision, config_key(cfg, model_path))
        self.tokenizer = load_tokenizer(model_path, revision, cfg.model.trust_remote_code)
        d = cfg.data
        if self.suite == "tofu":
            self.formatter = QAFormatter(self.tokenizer, cfg.tofu.max_length, cfg.tofu.chat_template)
            self.data = prepare_tofu(cfg.tofu, cfg.forget)
            self.trained_on = {"original": "TOFU full (forget + retain)", "retain": "TOFU retain only"}
        elif self.suite == "muse":  # MUSE's articles as raw documents (engine/data/muse.py)
            self.formatter = DocumentFormatter(self.tokenizer, cfg.muse.max_length)
            self.data = prepare_muse(cfg.muse, self.formatter, cfg.forget)
            self.trained_on = {"original": "the forget and retain articles", "retrain": "the retain articles"}
        else:
            if d.text_column:
                self.formatter = DocumentFormatter(self.tokenizer, d.max_length)
            else:
                self.formatter = QAFormatter(self.tokenizer, d.max_length, d.chat_template)
            self.data = prepare_text(d, cfg.forget, cfg.holdout, self.formatter)
            self.trained_on = {"original": "the training data with the forget rows", "retain": "the retain rows",
                               "retrain": "the training data without the forget rows"}  # fmt: skip
        self.cache = f"{self.suite}_eval.json"
        self.description = self.data.description
        self._streams: dict[str, TextStream] = {}

    def _text(self, name: str) -> TextStream:
        """A set's stream, encoded when first asked for: a Ray driver (``token_rows``) encodes none, and a worker
        whose forget and retain rows come from its launcher's token stores never encodes the retain set."""
        if name not in self._streams:
            d = self.data
            # the per-epoch retain NLL is measured on a probe as large as the forget set (it is a trend, not a
            # metric; the full retain set would cost more than the epoch on a CPU)
            rows = {"forget": d.forget, "retain": d.retain, "holdout": d.holdout,
                    "retain_probe": d.retain[: max(len(d.forget), 40)]}[name]  # fmt: skip
            self._streams[name] = TextStream(rows, self.formatter, self.tokenizer.pad_token_id)
        return self._streams[name]

    def forget_summary(self) -> dict:
        return self.data.forget_summary()

    def streams(self, augment: bool = False, folder: Path | None = None, backend=None) -> dict:
        """The forget and retain streams. With ``folder`` (the run's ``OUTPUT.tokens``): tokenized once, by the
        main process, a chunk of rows at a time, into token stores (engine/data/store.py) every process opens
        and reads only its rows from, so no process holds the whole tokenized retain set; without it, encoded
        in memory (``TextStream``)."""
        if folder is None:
            return self._with_idk({"forget": self._text("forget"), "retain": self._text("retain")})
        rows = {"forget": self.data.forget, "retain": self.data.retain}
        if backend is None or backend.is_main:
            for name, part in rows.items():
                write_rows(Path(folder) / name, part, self.formatter.encode_row)
        if backend is not None:
            backend.barrier()  # nobody opens a store before it is complete
        stores = {name: TokenStore(Path(folder) / name, self.tokenizer.pad_token_id) for name in rows}
        return self._with_idk(stores)

    def _with_idk(self, streams: dict) -> dict:
        """For a method that needs "idk" (IdkNLL, IdkDPO): each forget row's "I don't know" answer, on the forget
        stream, where the paired stream finds it (engine/data/paired.py): from method.idk_file, else TOFU's
        idontknow.jsonl beside its splits (other data without method.idk_file: refused by the method's rules)."""
        method = METHODS[self.cfg.method.name][1]
        if "idk" in method.needs:
            file = getattr(self.cfg.method, "idk_file", None)
            answers = read_answer_lines(file) if file else load_idk_answers(self.cfg.tofu.dataset)
            streams["forget"].idk = IdkAnswers(self.data.forget, answers, self.formatter, self.cfg.seed,
                                               with_forget=method.idk_with_forget)  # fmt: skip
        return streams

    def train_stream(self, target: str) -> TextStream:
        if target == "original":
            return TextStream(self.data.full, self.formatter, self.tokenizer.pad_token_id)
        return self._text("retain")

    def load(self, path: str, revision: str | None = None, trust_remote_code: bool = False):
        from safetensors import SafetensorError

        m = self.cfg.model
        # the large-model switches apply to every causal LM loaded (student, teacher, reference): checkpointing
        # acts only in train mode, so a frozen model in eval mode is unaffected by it
        switches = {
            "attn_implementation": m.attn_implementation,
            "gradient_checkpointing": m.gradient_checkpointing,
        }
        # a kernel that cannot run here is refused before a hub id is resolved
        check_attn_implementation(m.attn_implementation)
        if trust_remote_code and not revision:  # refused by load_causal_lm, before a hub id is resolved
            return load_causal_lm(path, revision, trust_remote_code, m.dtype, **switches)
        what = config_key(self.cfg, path)  # for the errors
        pinned = resolve_model(path, revision, what)
        try:
            return load_causal_lm(path, pinned, trust_remote_code, m.dtype, **switches)
        except SafetensorError as exc:  # a damaged file fetched from the hub (local ones are checked before)
            raise ModelError(
                f"a weight file of {path!r} is damaged ({first_line(exc)}): download it again"
            ) from None

    def build(self):
        """`unlearn train` fine-tunes ``model.path`` (a causal LM is never built from scratch here)."""
        m = self.cfg.model
        return self.load(m.path, m.revision, m.trust_remote_code)

    def check(self, model) -> None:
        check_vocab(model, self.tokenizer, self.cfg.model.path)

    def eval_settings(self) -> dict:
        if self.suite == "muse":
            return {"forget": self.forget_summary(), **self.cfg.muse.model_dump(mode="json")}
        if self.suite == "text":
            d, e = self.cfg.data, self.cfg.eval
            return {"forget": self.forget_summary(), "max_length": d.max_length, "max_rows": e.max_rows,
                    "max_new_tokens": e.max_new_tokens, "holdout": self.cfg.holdout.dataset}  # fmt: skip
        t = self.cfg.tofu
        return {
            "forget_split": t.forget_split,
            "num_authors": t.num_authors,
            "max_length": t.max_length,
            "chat_template": t.chat_template,
            "utility_examples": t.utility_examples,
            "max_new_tokens": t.max_new_tokens,
        }

    def evaluate(self, model, device, reference: dict | None = None, cache_dir=None, backend=None) -> dict:
        """TOFU metrics of ``model`` (a model, or a function that loads it: called only when the cache
        misses). Read from / written to ``cache_dir/tofu_eval.json`` when given; a cached result counts
        only if it was computed with the same settings and against the same reference. With several
        processes each evaluates its share of the rows and all get the same metrics (engine/eval/shard.py);
        the main one writes."""
        settings = {**self.eval_settings(), "reference": _fingerprint(reference)}
        cache = Path(cache_dir) / self.cache if cache_dir else None
        hit = None
        if cache is not None and cache.is_file():
            stored = json.loads(cache.read_text())
            hit = stored["metrics"] if stored.get("settings") == settings else None
            if hit is not None and not registry.produced(self.suite) <= hit.keys():
                hit = None  # written before the suite had a metric it now computes: evaluate again
        if backend is not None:
            hit = backend.broadcast_object(hit)  # the main rank decides: all ranks evaluate, or none
        if hit is not None:
            return hit
        if not isinstance(model, torch.nn.Module):
            model = model()
        e = self.cfg.eval
        progress = self.cfg.logging.progress and (backend is None or backend.is_main)
        if self.suite == "tofu":
            metrics = evaluate_tofu(model.to(device), self.tokenizer, self.formatter, self.data,
                                    batch_size=e.batch_size, max_new_tokens=self.cfg.tofu.max_new_tokens, device=device,
                                    reference=reference, progress=progress, backend=backend)  # fmt: skip
        elif self.suite == "muse":
            u = self.cfg.muse
            metrics = evaluate_muse(model.to(device), self.tokenizer, self.data, batch_size=e.batch_size,
                                    verbmem_max_new_tokens=u.verbmem_max_new_tokens,
                                    knowmem_max_new_tokens=u.knowmem_max_new_tokens,
                                    max_prompt_tokens=u.max_prompt_tokens, device=device, reference=reference,
                                    progress=progress, backend=backend)  # fmt: skip
        else:
            metrics = evaluate_text(model.to(device), self.formatter, self.data, batch_size=e.batch_size,
                                    max_new_tokens=e.max_new_tokens, max_rows=e.max_rows, device=device,
                                    reference=reference, progress=progress, backend=backend)  # fmt: skip
        if backend is not None:
            backend.barrier()  # nobody writes the cache before every process has decided hit or miss
        if cache_dir is not None and (backend is None or backend.is_main):
            self.keep_scores(cache_dir, metrics, reference)
        return metrics

    def keep_scores(self, folder, metrics: dict, reference: dict | None = None) -> None:
        """Cache ``metrics`` of the model in ``folder`` (when it is a local folder) for later evaluations."""
        if Path(folder).is_dir():
            record = {
                "settings": {**self.eval_settings(), "reference": _fingerprint(reference)},
                "metrics": metrics,
            }
            write_text_atomic(Path(folder) / self.cache, json.dumps(record, default=float) + "\n")

    def history_row(self, model, device, epoch: int, lr, losses: dict, metrics: dict | None = None) -> dict:
        """Answer NLL on the forget set, the holdout authors and a retain probe (cheap, every epoch)."""
        t = time.perf_counter()
        bs = self.cfg.eval.batch_size
        row = {
            "epoch": epoch,
            "forget_nll": answer_nll(model, self._text("forget"), bs, device),
            "holdout_nll": answer_nll(model, self._text("holdout"), bs, device),
            "retain_nll": answer_nll(model, self._text("retain_probe"), bs, device),
            **{f"{k}_loss": v for k, v in losses.items()},
        }
        row["eval_seconds"] = time.perf_counter() - t
        return row

    def rewind_series(self, history: list[dict], final: dict) -> tuple[list[float], float, dict]:
        """SCRUB+R with NLL for error: the forget answers' NLL per epoch, and as target the final model's
        NLL on the holdout authors (same distribution, never trained on); and how the report names them."""
        series, target = [r["forget_nll"] for r in history], history[-1]["holdout_nll"]
        return series, target, {"target_nll": target, "forget_nlls": series}

    calibration_measure = "answer NLL"  # what the calibrated schedule steers, for its log

    def calibration(self, row: dict) -> tuple[float, float]:
        """SCRUB's calibrated schedule: (forget answers' NLL, the holdout rows' NLL: answers of the same kind the
        model never saw) from a history row; the schedule freezes the second at epoch 0, the original's."""
        return row["forget_nll"], row["holdout_nll"]

    def forget_error(self, model, device) -> float:
        """The forget answers' NLL alone (eval mode): the calibrated schedule's check inside a max phase. Every
        rank scores the whole forget set (under ZeRO-3 each forward is collective)."""
        return answer_nll(model, self._text("forget"), self.cfg.eval.batch_size, device)

    def save(self, model, path, title: str, settings: dict, metrics: dict, weights=None, record=None,
             forget: bool = True) -> None:  # fmt: skip
        summary = self.forget_summary()
        headline = {k: metrics.get(k) for k in self.headline}
        heading = (
            "TOFU metrics (open-unlearning's definitions)"
            if self.suite == "tofu"
            else "MUSE metrics (the MUSE authors' definitions)"
            if self.suite == "muse"
            else "Metrics (NLL per token)"
        )
        d = self.cfg.data
        sources = (
            [self.cfg.tofu.dataset]
            if self.suite == "tofu"
            else [self.cfg.muse.path or MUSE_CORPORA[self.cfg.muse.corpus]]
            if self.suite == "muse"
            else [d.dataset, self.cfg.forget.dataset if self.cfg.forget.kind == "dataset" else None]
        )
        card = run_card(self.cfg, path, self.model_path, title, summary if forget else None, settings, headline,
                        heading, task_type="text-generation", sources=sources,
                        target=(record or {}).get("target"))  # fmt: skip
        record = {"forget": summary, "method": settings, "metrics": metrics, **(record or {})}
        save_checkpoint(model, path, self.tokenizer, card, record, state_dict=weights)

    describe = staticmethod(describe)

    def row_ids(self, stream: str) -> list | None:
        rows = {"forget": self.data.forget, "retain": self.data.retain}.get(stream)
        return None if rows is None else [r["id"] for r in rows]
