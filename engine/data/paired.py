"""The one paired stream of every task: forget rows, each with a retain partner, in one batch.

The step shape of GradDiff, NPO (open-unlearning's ``ForgetRetainDataset``, anchored on the forget set)
and NegGrad+. Its length and order are the forget set's. Each forget row's partner is drawn from
(seed, row), not from the batch, so the pairs do not depend on how a global batch is split over ranks
and micro-batches. The forget stream builds the joined batch (``join``: images concatenate, text pads
both halves together); this stream marks the halves: ``is_forget`` per row, ``forget_token`` per
counted item (a token of text; an image counts once, so there it equals ``is_forget``) and
``sequence``, the row of each counted item (what NPO sums a sequence's log-probability over).

A forget stream that carries ``idk`` (``IdkAnswers``: the task attaches it for a method that needs "idk") adds a
block: per forget row its question with an "I don't know" answer, after the retain rows, marked ``is_idk`` /
``idk_token``; with ``with_forget=False`` (IdkNLL reads no forget answer) the forget rows are left out of the
batch, so the rows are [forget | retain | idk] or [retain | idk], each block in the order of ``rows``.
"""

from __future__ import annotations

import hashlib

import torch

from engine.errors import DataError


def partner_rows(rows: torch.Tensor, retain_size: int, seed: int) -> torch.Tensor:
    """The retain partner of each forget row: a draw seeded by (seed, row) alone."""
    draws = [
        int(
            torch.randint(
                retain_size, (1,), generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i))
            )
        )
        for i in rows
    ]
    return torch.tensor(draws, dtype=torch.long)


class PairedStream:
    def __init__(self, forget, retain):
        if len(retain) == 0:
            raise DataError(
                "the retain set is empty: a paired method (GradDiff, NPO, NegGrad+) needs retain rows"
            )
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return len(self.forget)

    def get(self, rows: torch.Tensor, seed: int = 0) -> dict:
        partners = partner_rows(rows, len(self.retain), seed)
        idk = getattr(self.forget, "idk", None)
        if idk is None:
            batch = self.forget.join(rows, self.retain, partners, seed)
            n = len(rows) + len(partners)
            is_forget = torch.arange(n) < len(rows)
        else:  # text only: the three blocks padded together, as join pads two
            from engine.data.text import collate

            forget = [self.forget.example(int(i)) for i in rows] if idk.with_forget else []
            examples = (
                forget + [self.retain.example(int(i)) for i in partners] + [idk.example(int(i)) for i in rows]
            )
            batch = collate(examples, self.forget.pad_id)
            n, first_idk = len(examples), len(examples) - len(rows)
            is_forget = torch.arange(n) < len(forget)
            batch["is_idk"] = torch.arange(n) >= first_idk
            batch["idk_token"] = batch["is_idk"][batch["sequence"]]
        sequence = batch.setdefault("sequence", torch.arange(n))
        batch["is_forget"] = is_forget
        batch["forget_token"] = is_forget[sequence]
        batch["rows"], batch["partner_rows"] = rows, partners
        return batch


def idk_choice(row_id, seed: int, n: int) -> int:
    """Which of ``n`` "I don't know" answers forget row ``row_id`` (its stable id) gets: a hash of (seed, id), so
    the choice is the same in every epoch, on every rank and micro-batch split, and in a resumed run."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


class IdkAnswers:
    """Per forget row, its question with an "I don't know" answer (``idk_choice`` of ``answers``), encoded on
    first use by the task's formatter exactly as the forget rows are. ``rows``: the forget rows in the forget
    stream's order (``question`` and ``id`` each); ``with_forget``: the forget answers stay in the paired batch
    (IdkDPO's dispreferred answers), else only the idk answers and the retain rows are (IdkNLL)."""

    def __init__(self, rows: list[dict], answers: list[str], formatter, seed: int, with_forget: bool = True):
        if not answers:
            raise DataError('the "I don\'t know" answers file has no answer: one answer a line')
        if rows and "question" not in rows[0]:
            raise DataError('"I don\'t know" answers replace answers to questions: the forget rows have none')
        self.rows, self.answers, self.formatter = rows, answers, formatter
        self.seed, self.with_forget = seed, with_forget
        self._encoded: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def answer(self, i: int) -> str:
        return self.answers[idk_choice(self.rows[i].get("id", i), self.seed, len(self.answers))]

    def example(self, i: int) -> dict:
        if i not in self._encoded:
            self._encoded[i] = self.formatter.encode(self.rows[i]["question"], self.answer(i))
        return self._encoded[i]
