"""Question-answer data for causal language models: TOFU (Maini et al. 2024) through `datasets`.

A local copy laid out as the hub (one ``<split>.jsonl`` per split, e.g. ../shared/data/tofu) or the
hub id ``locuslab/TOFU``. Every example keeps a stable id: its row index in the ``full`` split, so a
forget request, a report or a receipt names examples, never their text.

Encoding follows the causal-LM loss: ``input_ids`` = prompt + answer (+ end of sequence), ``labels``
= the same ids with the prompt masked to -100; the loss predicts token t+1 from tokens <= t and counts
only answer tokens. The chat template is used when the tokenizer has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.data.selection import ids_sha256
from engine.errors import DataError

IGNORE = -100  # the label value transformers' losses skip
SPLIT_FRACTION = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
QA_PER_AUTHOR = 20  # TOFU: 200 fictitious authors, 20 question-answer pairs each
TOFU_AUTHORS = 200


def load_tofu_split(source: str, name: str) -> list[dict]:
    """One TOFU split as a list of rows: ``{source}/{name}.jsonl`` when ``source`` is a local folder,
    else ``datasets.load_dataset(source, name)`` (the hub's layout: one config per split)."""
    path = Path(source)
    try:
        if path.is_dir():
            file = path / f"{name}.jsonl"
            if not file.is_file():
                raise DataError(
                    f"TOFU split {name!r} not found: {file} does not exist (a local TOFU folder holds "
                    "full.jsonl, forget10.jsonl, retain90.jsonl, ...)"
                )
            # read directly, not through datasets.load_dataset: that would leave an Arrow copy of every
            # row (forget answers included) in the datasets cache after the run (forget-data hygiene)
            return _check_columns(_read_jsonl(file), name)
        elif path.exists():
            raise DataError(f"tofu.dataset {source!r} is a file; give the folder holding the split files")
        else:
            import datasets

            ds = datasets.load_dataset(source, name, split="train")
    except DataError:
        raise
    except Exception as err:  # hub/network/format errors: say what was tried
        raise DataError(
            f"could not load TOFU split {name!r} from {source!r}: {err}. Offline, point tofu.dataset at a "
            "local folder of <split>.jsonl files (e.g. ../shared/data/tofu)"
        ) from err
    return _check_columns(ds.to_list(), name)


def _read_jsonl(file: Path) -> list[dict]:
    rows = []
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{file}:{n} is not a JSON line ({err}); a TOFU split has one row per line"
                    ) from err
    return rows


def _check_columns(rows: list[dict], name: str) -> list[dict]:
    if rows and not {"question", "answer"} <= set(rows[0]):
        raise DataError(f"TOFU split {name!r} lacks the question/answer columns (has {sorted(rows[0])})")
    return rows


@dataclass
class TofuData:
    """The TOFU sets of one run. ``forget``/``retain``/``full`` rows carry ``id`` (row in ``full``)."""

    forget_split: str
    num_authors: int
    forget_authors: int
    full: list[dict]
    forget: list[dict]
    retain: list[dict]
    holdout: list[dict]
    forget_eval: list[dict]  # forget rows + paraphrased/perturbed answers (truth ratio)
    retain_eval: list[dict]  # retain rows + paraphrased/perturbed answers (model utility)
    real_authors: list[dict]
    world_facts: list[dict]
    description: str = ""

    def forget_summary(self) -> dict:
        ids = [int(r["id"]) for r in self.forget]
        return {
            "kind": "tofu",
            "split": self.forget_split,
            "authors": self.forget_authors,
            "size": len(ids),
            "ids_sha256": ids_sha256(ids),
            "description": self.description,
        }


def prepare_tofu(cfg) -> TofuData:
    """Resolve the forget/retain/holdout/utility sets of ``cfg`` (a ``TofuConfig``).

    ``num_authors`` = N keeps a CPU-sized slice with TOFU's own structure: the forget set is the
    first k = round(N * fraction) authors of the forget split (TOFU's last authors), the retain set the
    first N - k authors, the holdout (non-members) the first k authors of the matching holdout split.
    """
    fraction = SPLIT_FRACTION[cfg.forget_split]
    n = cfg.num_authors or TOFU_AUTHORS
    if n > TOFU_AUTHORS:
        raise DataError(f"tofu.num_authors={n}: TOFU has {TOFU_AUTHORS} authors")
    k = max(1, round(n * fraction))
    if k >= n:
        raise DataError(
            f"tofu.num_authors={n} with {cfg.forget_split} leaves no retain author; use at least {k + 1}"
        )
    full = load_tofu_split(cfg.dataset, "full")
    if len(full) != TOFU_AUTHORS * QA_PER_AUTHOR:
        raise DataError(f"TOFU full has {len(full)} rows, expected {TOFU_AUTHORS * QA_PER_AUTHOR}")
    for i, row in enumerate(full):
        row["id"] = i
    total_forget = round(TOFU_AUTHORS * fraction) * QA_PER_AUTHOR
    forget = full[len(full) - total_forget :][: k * QA_PER_AUTHOR]  # forgetXX = full's last authors
    retain = full[: (n - k) * QA_PER_AUTHOR]
    suffix = cfg.forget_split.removeprefix("forget")
    holdout = load_tofu_split(cfg.dataset, f"holdout{suffix}")[: k * QA_PER_AUTHOR]
    forget_eval = load_tofu_split(cfg.dataset, f"{cfg.forget_split}_perturbed")[: k * QA_PER_AUTHOR]
    for row, ev in zip(forget, forget_eval, strict=True):
        if row["question"] != ev["question"]:
            raise DataError(f"{cfg.forget_split}_perturbed is not aligned with full (row id {row['id']})")
        ev["id"] = row["id"]
    # retain_perturbed is full's first 400 rows (first 20 authors): keep those of retain authors.
    retain_eval = load_tofu_split(cfg.dataset, "retain_perturbed")[: len(retain)]
    limit = cfg.utility_examples
    real_authors = load_tofu_split(cfg.dataset, "real_authors_perturbed")[:limit]
    world_facts = load_tofu_split(cfg.dataset, "world_facts_perturbed")[:limit]
    if limit is not None:
        retain_eval = retain_eval[:limit]
    description = (
        f"TOFU {cfg.forget_split}: {k} of {n} authors forgotten ({len(forget)} QA pairs), "
        f"{len(retain)} retain, {len(holdout)} holdout"
    )
    return TofuData(
        cfg.forget_split,
        n,
        k,
        retain + forget,
        forget,
        retain,
        holdout,
        forget_eval,
        retain_eval,
        real_authors,
        world_facts,
        description,
    )


class QAFormatter:
    """Turns (question, answer) into token ids with the prompt masked, the same way for training,
    evaluation and generation. ``chat_template``: auto (use it when the tokenizer has one), on, off."""

    def __init__(self, tokenizer, max_length: int = 256, chat_template: str = "auto"):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template == "on" and not has_template:
            raise DataError("tofu.chat_template=on but the tokenizer has no chat template; use auto or off")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_chat = has_template and chat_template != "off"

    def prompt_ids(self, question: str) -> list[int]:
        tok = self.tokenizer
        if self.use_chat:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True
            )
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return tok(f"Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"]

    def encode(self, question: str, answer: str) -> dict:
        """``{"input_ids", "labels"}`` (lists): labels are -100 on the prompt."""
        tok = self.tokenizer
        prompt = self.prompt_ids(question)
        answer_ids = tok(" " + answer if not self.use_chat else answer, add_special_tokens=False)["input_ids"]
        eos = tok.eos_token_id
        if eos is not None:
            answer_ids = answer_ids + [eos]  # the model learns to stop after the answer
        ids = (prompt + answer_ids)[: self.max_length]
        if len(prompt) >= len(ids):
            raise DataError(
                f"a prompt of {len(prompt)} tokens leaves no answer token within tofu.max_length="
                f"{self.max_length}; raise max_length"
            )
        labels = [IGNORE] * len(prompt) + ids[len(prompt) :]
        return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict], pad_id: int, padding_side: str = "right") -> dict:
    """Pad encoded examples into a batch for the loop's LM forward (``engine.models.causal_lm``).

    Returns ``input_ids``/``attention_mask``/``token_labels`` [B, L] (``token_labels`` = -100 on prompt
    and padding), and the flattened next-token targets of the counted positions: ``labels`` [N] and
    ``sequence`` [N] (the batch row of each counted token), in row-major order of ``token_labels[:, 1:]``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[i, cols] = torch.tensor(e["input_ids"])
        labels[i, cols] = torch.tensor(e["labels"])
        mask[i, cols] = 1
    shifted = labels[:, 1:]
    counted = shifted != IGNORE
    rows = torch.arange(len(examples)).unsqueeze(1).expand_as(shifted)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_labels": labels,
        "labels": shifted[counted],
        "sequence": rows[counted],
    }


class TextStream:
    """A stream the loop draws batches from (same protocol as ``ImageStream``)."""

    def __init__(self, rows: list[dict], formatter: QAFormatter, pad_id: int):
        self.encoded = [formatter.encode(r["question"], r["answer"]) for r in rows]
        self.ids = torch.tensor([int(r.get("id", i)) for i, r in enumerate(rows)])
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.encoded)

    def get(self, rows: torch.Tensor, seed: int = 0) -> dict:
        batch = collate([self.encoded[int(i)] for i in rows], self.pad_id)
        batch["rows"] = rows
        return batch

    def example(self, i: int) -> dict:
        return self.encoded[i]

    def join(self, rows: torch.Tensor, other, other_rows: torch.Tensor, seed: int = 0) -> dict:
        """``rows`` of this stream then ``other_rows`` of ``other`` (a TextStream or TokenStore), padded
        into one batch (engine/data/paired.py)."""
        return join_text(self, rows, other, other_rows)


def join_text(stream, rows: torch.Tensor, other, other_rows: torch.Tensor) -> dict:
    examples = [stream.example(int(i)) for i in rows] + [other.example(int(i)) for i in other_rows]
    return collate(examples, stream.pad_id)
