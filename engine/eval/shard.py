"""Evaluation split across processes: each rank runs its share of the rows, every rank gets all results back.

The rows are cut into batches of ``batch_size`` as one process would cut them, and each rank takes a
contiguous run of WHOLE batches (``share``). So every row is scored, or generated from, in the very batch
(same neighbours, same padding width) it would be in alone, and the gathered per-row results are those of
one process bit for bit; the metrics are then computed from the full per-row lists exactly as before.

Every rank runs the same number of batches: a rank one batch short runs one extra single-row batch (a
repeat of row 0) whose result is dropped. Under ZeRO-3 every forward and every ``generate`` call is
collective (the parameters are gathered layer by layer from all ranks), so a rank that ran fewer would
leave the others waiting forever; elsewhere the stand-in costs nothing, as that rank would wait at the
gather anyway.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from engine.backends.base import Backend

T = TypeVar("T")


@dataclass(frozen=True)
class Share:
    """One rank's part of ``n`` rows cut into batches: ``rows`` to run in order (this rank's own rows, then
    the stand-in), of which the first ``real`` are its own; ``batches`` is the same on every rank."""

    rows: list[int]
    real: int
    batches: int


def share(n: int, batch_size: int, rank: int, world_size: int) -> Share:
    """Rank ``rank``'s share of rows ``0..n-1`` in batches of ``batch_size``: the ``b = ceil(n / batch_size)``
    batches are dealt out in order, ``b // world_size`` per rank and one more to each of the LAST
    ``b % world_size`` ranks.

    The extras go last because the last batch may be partial: the rank holding it then runs the most
    batches and needs no stand-in, so a stand-in always follows whole batches and forms a batch of its own
    when the caller cuts ``rows`` into batches of ``batch_size``."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"share(n={n}, batch_size={batch_size}, rank={rank}, world_size={world_size})")
    total = -(-n // batch_size)
    base, extra = divmod(total, world_size)
    first_long = world_size - extra  # ranks from here on run base + 1 batches
    start = rank * base + max(0, rank - first_long)
    own = base + (rank >= first_long)
    most = base + (extra > 0)
    rows = list(range(start * batch_size, min(n, (start + own) * batch_size)))
    pad = [0] * (most - own)  # at most one stand-in batch, of one row
    return Share(rows + pad, len(rows), most)


def is_shared(backend: Backend | None) -> bool:
    """Whether evaluation is split across processes (a backend of several ranks)."""
    return backend is not None and backend.world_size > 1


def map_rows(
    run: Callable[[list[int]], Sequence[T]], n: int, batch_size: int, backend: Backend | None
) -> list[T]:
    """``run(rows)`` -> one result per row, on this rank's share of ``n`` rows; returns every row's result
    in row order, on every rank (all ranks compute the metrics, so they all return the same numbers).
    ``run`` must cut the rows it is given into batches of ``batch_size`` from the first."""
    if not is_shared(backend):
        return list(run(list(range(n))))
    mine = share(n, batch_size, backend.rank, backend.world_size)
    out = run(mine.rows)
    if len(out) != len(mine.rows):
        raise RuntimeError(f"map_rows: {len(out)} results for {len(mine.rows)} rows")
    parts = backend.gather_object(list(out[: mine.real]))  # shares are contiguous in rank order
    return list(itertools.chain.from_iterable(parts))
