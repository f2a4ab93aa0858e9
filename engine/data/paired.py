"""The one paired stream of every task: forget rows, each with a retain partner, in one batch.

The step shape of GradDiff, NPO (open-unlearning's ``ForgetRetainDataset``, anchored on the forget set)
and NegGrad+. Its length and order are the forget set's. Each forget row's partner is drawn from
(seed, row), not from the batch, so the pairs do not depend on how a global batch is split over ranks
and micro-batches. The forget stream builds the joined batch (``join``: images concatenate, text pads
both halves together); this stream marks the halves: ``is_forget`` per row, ``forget_token`` per
counted item (a token of text; an image counts once, so there it equals ``is_forget``) and
``sequence``, the row of each counted item (what NPO sums a sequence's log-probability over).
"""

from __future__ import annotations

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
        batch = self.forget.join(rows, self.retain, partners, seed)
        n = len(rows) + len(partners)
        is_forget = torch.arange(n) < len(rows)
        sequence = batch.setdefault("sequence", torch.arange(n))
        batch["is_forget"] = is_forget
        batch["forget_token"] = is_forget[sequence]
        batch["rows"], batch["partner_rows"] = rows, partners
        return batch
