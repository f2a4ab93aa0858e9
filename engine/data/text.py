"""Text data for causal language models: raw documents or prompt/answer pairs from any file or hub id, encoded
for the causal-LM loss (TOFU, the preset, reads its rows in engine/data/tofu.py and encodes them here).

Encoding: ``input_ids`` = prompt + answer (+ end of sequence), ``labels`` = the same ids with the prompt masked to
-100; the loss predicts token t+1 from tokens <= t and counts only answer tokens (every token of a document). The
chat template is used when the tokenizer has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.data.selection import ids_sha256
from engine.errors import DataError

IGNORE = -100  # the label value transformers' losses skip


def earlier_keys(fcfg, key=lambda i: i) -> set:
    """``forget.earlier_ids`` (the ids forgotten by earlier versions: `unlearn request process`), as ``key`` makes
    them: the rows they name are in neither the forget nor the retain set, so no forgotten row is trained on again.
    They are matched as the forget ids are (``key``), and one that names no row is ignored, as for images: no row
    of it is trained on, and the data may since have dropped the row it named."""
    return {key(i) for i in (getattr(fcfg, "earlier_ids", None) or [])} if fcfg is not None else set()


def refuse_forgotten_again(wanted: list, earlier: set, key=lambda i: i) -> None:
    """Refuse forget ids that an earlier version forgot already (``earlier``: ``earlier_keys``)."""
    again = [i for i in wanted if key(i) in earlier]
    if again:
        raise DataError(
            f"{len(again)} forget ids were forgotten by an earlier version (forget.earlier_ids), e.g. {again[:5]}: "
            "an example is forgotten once; drop them from forget.ids"
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

    def encode_row(self, row: dict) -> dict:
        return self.encode(row["question"], row["answer"])

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
        self.encoded = [formatter.encode_row(r) for r in rows]
        self.ids = [r.get("id", i) for i, r in enumerate(rows)]
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


class DocumentFormatter:
    """Raw documents: the loss counts every token. A document is tokenized once (with the tokenizer's own
    special tokens, and an end-of-sequence after it) and cut into windows of ``max_length`` tokens, each an
    example; a last window of one token (nothing to predict) is dropped."""

    def __init__(self, tokenizer, max_length: int = 256):
        self.tokenizer, self.max_length = tokenizer, max_length

    def windows(self, text: str) -> list[list[int]]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        cut = [ids[i : i + self.max_length] for i in range(0, len(ids), self.max_length)]
        return [w for w in cut if len(w) >= 2]

    def encode_row(self, row: dict) -> dict:
        return {"input_ids": list(row["input_ids"]), "labels": list(row["input_ids"])}


@dataclass
class TextData:
    """The forget, retain and holdout rows of a run on any text data. Rows carry a stable ``id``: the row's
    ``data.id_column`` value or its index in the training split (``forget:I`` / ``holdout:I`` for rows of a
    separate corpus), and for documents ``ROW_ID:WINDOW``; ``question``/``answer`` (pairs) or
    ``input_ids``/``text`` (a document's window)."""

    forget: list[dict]
    retain: list[dict]
    holdout: list[dict]
    kind: str  # the forget kind
    description: str
    documents: bool

    @property
    def full(self) -> list[dict]:
        """What the Original is trained on: the training data with the forget rows."""
        return self.retain + self.forget

    def forget_summary(self) -> dict:
        ids = sorted({r["source_id"] for r in self.forget}, key=str)
        return {
            "kind": self.kind,
            "description": self.description,
            "size": len(self.forget),
            "rows": len(ids),
            "ids_sha256": ids_sha256([str(i) for i in ids]),
        }


def _id(row: dict, i: int, id_column: str | None, prefix: str = ""):
    """A row's stable id: its ``id_column`` value, else its index; rows of a separate corpus (``prefix``
    forget: or holdout:) are prefixed so that they never collide with training rows' ids."""
    if id_column is not None and id_column in row:
        return f"{prefix}{row[id_column]}" if prefix else row[id_column]
    if id_column is not None and not prefix:
        raise DataError(f"data.id_column {id_column!r} is not a column (the columns are {sorted(row)})")
    return f"{prefix}{i}" if prefix else i


def _matches(row: dict, where: dict) -> bool:
    for column, wanted in where.items():
        if column not in row:
            raise DataError(
                f"forget.where names {column!r}, which is not a column (the columns are {sorted(row)})"
            )
        if row[column] not in (wanted if isinstance(wanted, list) else [wanted]):
            return False
    return True


def _select(train: list[dict], fcfg, id_column: str | None) -> tuple[list[bool], str]:
    """Which training rows are forgotten (``forget.kind`` ids | where | random), and how they were chosen."""
    from engine.data.selection import requested_ids

    if fcfg.kind == "ids":
        wanted = requested_ids(fcfg.ids, fcfg.ids_file, "forget")
        if not wanted:
            raise DataError(
                "forget.kind=ids needs forget.ids or forget.ids_file (the ids of the rows to forget)"
            )
        refuse_forgotten_again(wanted, earlier_keys(fcfg, str), str)
        known = {str(r["source_id"]) for r in train}
        missing = [i for i in wanted if str(i) not in known]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(wanted)} forget ids are not rows of data.dataset, e.g. {missing[:5]} (ids are "
                f"{'the ' + id_column + ' column' if id_column else 'row indices of the training split'})"
            )
        keys = {str(i) for i in wanted}
        return [str(r["source_id"]) in keys for r in train], f"{len(wanted)} rows named by id"
    if fcfg.kind == "where":
        mask = [_matches(r, fcfg.where) for r in train]
        if not any(mask):
            raise DataError(
                f"forget.where={fcfg.where} matches no row of data.dataset; check the column and value"
            )
        what = " and ".join(f"{k} = {v!r}" for k, v in fcfg.where.items())
        return mask, f"every row whose {what} ({sum(mask)} rows)"
    if fcfg.kind == "random":
        if fcfg.fraction is None:
            raise DataError("forget.kind=random needs forget.fraction (e.g. 0.1)")
        g = torch.Generator().manual_seed(fcfg.seed)
        n = max(1, round(len(train) * fcfg.fraction))
        chosen = set(torch.randperm(len(train), generator=g)[:n].tolist())
        return [
            i in chosen for i in range(len(train))
        ], f"{n} random rows ({fcfg.fraction:.0%}), seed {fcfg.seed}"
    raise DataError(
        f"forget.kind={fcfg.kind} is not a text forget kind: use ids, ids_file, where, random or dataset"
    )


def prepare_text(dcfg, fcfg, hcfg, formatter) -> TextData:
    """Rows of ``data.dataset`` (any file, folder or hub id ``datasets`` reads) as prompt/answer pairs or
    document windows, split into forget and retain by ``forget.kind`` (the rows of ``forget.earlier_ids`` in
    neither), plus the holdout corpus."""
    from engine.data.sources import load_rows

    documents = dcfg.text_column is not None
    columns = [dcfg.text_column] if documents else [dcfg.prompt_column, dcfg.answer_column]
    keys = ["data.text_column"] if documents else ["data.prompt_column", "data.answer_column"]

    def rows_of(source: str, what: str, prefix: str = "") -> list[dict]:
        raw = load_rows(source, dcfg.train_split if what == "data.dataset" else "train", what)
        if not raw:
            raise DataError(f"{what} {source!r} has no rows")
        missing = [(k, c) for k, c in zip(keys, columns, strict=True) if c not in raw[0]]
        if missing:
            key, column = missing[0]
            raise DataError(
                f"{what} {source!r} has no column {column!r} ({key}; its columns are {sorted(raw[0])}): "
                f"set {key} to one of them"
            )
        out = []
        for i, r in enumerate(raw):
            row = {**r, "source_id": _id(r, i, dcfg.id_column, prefix)}
            if not documents:
                row.update(question=str(r[dcfg.prompt_column]), answer=str(r[dcfg.answer_column]))
            out.append(row)
        return out

    train = rows_of(dcfg.dataset, "data.dataset")
    earlier = earlier_keys(fcfg, str)  # ids matched as the forget ids are: as strings (_select)
    if earlier:  # forgotten by earlier versions: neither forgotten nor retained here, never trained on again
        train = [r for r in train if str(r["source_id"]) not in earlier]
    if fcfg.kind == "dataset":
        forget_rows, retain_rows = rows_of(fcfg.dataset, "forget.dataset", "forget:"), train
        key = (lambda r: r[dcfg.text_column]) if documents else (lambda r: (r["question"], r["answer"]))
        seen = {key(r) for r in train}
        overlap = [r["source_id"] for r in forget_rows if key(r) in seen]
        if overlap:
            raise DataError(
                f"{len(overlap)} rows of forget.dataset are also in data.dataset (e.g. {overlap[:3]}): the retain set "
                "would teach them again; remove them from data.dataset, or forget them by id or filter instead"
            )
        how = f"the {len(forget_rows)} rows of {fcfg.dataset}"
    else:
        mask, how = _select(train, fcfg, dcfg.id_column)
        forget_rows = [r for r, m in zip(train, mask, strict=True) if m]
        retain_rows = [r for r, m in zip(train, mask, strict=True) if not m]
        if not retain_rows:
            raise DataError("the forget set is the whole training data: nothing would be retained")
    holdout_rows = rows_of(hcfg.dataset, "holdout.dataset", "holdout:") if hcfg.dataset else []

    def examples(rows: list[dict]) -> list[dict]:
        if not documents:
            return [{"id": r["source_id"], "source_id": r["source_id"], "question": r["question"],
                     "answer": r["answer"]} for r in rows]  # fmt: skip
        out = []
        for r in rows:
            for w, ids in enumerate(formatter.windows(str(r[dcfg.text_column]))):
                out.append({"id": f"{r['source_id']}:{w}", "source_id": r["source_id"], "input_ids": ids})
        return out

    forget, retain, holdout = examples(forget_rows), examples(retain_rows), examples(holdout_rows)
    unit = "windows" if documents else "pairs"
    description = (
        f"{how}: {len(forget)} forget {unit} ({len(forget_rows)} rows), {len(retain)} retain, "
        f"{len(holdout)} holdout"
    )
    return TextData(forget, retain, holdout, fcfg.kind, description, documents)
