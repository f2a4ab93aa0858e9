"""Deterministic data order. Every (seed, epoch, stream) has one documented permutation, so a run
can be reproduced, resumed mid-way, or transcribed independently (the tests do exactly that).

A phase that takes more steps than one pass over its stream holds (SCRUB's calibrated schedule cycles a
small forget set) draws pass ``repeat`` = 1, 2, ... of the epoch from its own permutation: the seed gains
``repeat * REPEAT_STRIDE``. Pass 0 is the epoch's order above, so a single pass is unchanged."""

from __future__ import annotations

import torch

STREAM_CODES = {"forget": 1, "retain": 2, "paired": 3}
# A prime far above 1_009 * any epoch count: (epoch, repeat) pairs of one seed never share a permutation seed.
REPEAT_STRIDE = 2_147_483_647


def order_seed(seed: int, epoch: int, stream: str, repeat: int = 0) -> int:
    return seed * 1_000_003 + epoch * 1_009 + STREAM_CODES.get(stream, 3) + repeat * REPEAT_STRIDE


def epoch_order(n: int, seed: int, epoch: int, stream: str, repeat: int = 0) -> torch.Tensor:
    """The shuffled order of a stream of ``n`` rows in ``epoch`` (its pass ``repeat`` within that epoch):
    ``torch.randperm`` seeded by ``seed * 1_000_003 + epoch * 1_009 + code(stream) + repeat * 2_147_483_647``
    (forget=1, retain=2)."""
    g = torch.Generator().manual_seed(order_seed(seed, epoch, stream, repeat))
    return torch.randperm(n, generator=g)
