"""Deterministic data order. Every (seed, epoch, stream) has one documented permutation, so a run
can be reproduced, resumed mid-way, or transcribed independently (the tests do exactly that)."""

from __future__ import annotations

import torch

STREAM_CODES = {"forget": 1, "retain": 2, "paired": 3}


def order_seed(seed: int, epoch: int, stream: str) -> int:
    return seed * 1_000_003 + epoch * 1_009 + STREAM_CODES.get(stream, 3)


def epoch_order(n: int, seed: int, epoch: int, stream: str) -> torch.Tensor:
    """The shuffled order of a stream of ``n`` rows in ``epoch``: ``torch.randperm`` seeded by
    ``seed * 1_000_003 + epoch * 1_009 + code(stream)`` (forget=1, retain=2)."""
    g = torch.Generator().manual_seed(order_seed(seed, epoch, stream))
    return torch.randperm(n, generator=g)
