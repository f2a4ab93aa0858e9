"""What every backend shares: how one configured (global) batch becomes this process's micro-batches.

A global batch of ``batch_size`` rows (the stream's rows in this epoch's seeded order, the partial
last one kept) is cut into ``world_size`` contiguous shares, one per rank, and each share into
``accum`` micro-batches (gradient accumulation). Every rank runs the same number of micro-batches per
step whatever the sizes (ZeRO-3 gathers parameters collectively in every forward): a micro-batch with
no rows (a forget set smaller than ranks x accumulation steps) is a zero-weight stand-in, one real row
whose loss is multiplied by 0 (and whose forward leaves BatchNorm's running statistics as they were:
engine/loop.py). Each micro-batch carries ``share``: its counted rows (examples, or
answer tokens of a causal LM) over the global batch's, so that summing ``loss_sum / count * share``
over micro-batches and ranks gives the global batch's mean exactly as one process would compute it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

from engine.backends.sampling import epoch_order, order_seed


class Backend:
    rank: int = 0
    world_size: int = 1
    accum: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the loop runs forwards in: mixed precision where this backend casts them itself
        (single.py); none here, and none for DeepSpeed, whose engine holds the model in its compute dtype."""
        return contextlib.nullcontext()

    def batches(
        self,
        stream,
        batch_size: int,
        seed: int,
        epoch: int,
        name: str,
        skip: int = 0,
        steps: int | None = None,
    ) -> Iterator[list[dict]]:
        """This rank's micro-batches, one list per optimizer step, from step ``skip`` on (a resumed
        run: the order and each step's draw seed are those of the uninterrupted run).

        ``steps``: None = one pass over the stream in the epoch's order. A number = exactly that many steps:
        fewer than a pass cuts it short; more cycles the stream, pass p of the epoch in its own order
        (``epoch_order(..., repeat=p)``, its last batch partial as in any pass). Step k's rows depend on
        (seed, epoch, name, k) alone, so every rank and a resumed run compute the same plan."""
        per_pass = self.num_batches(stream, batch_size)
        count = per_pass if steps is None else (steps if per_pass else 0)
        orders: dict[int, tuple] = {}  # pass -> its batches of rows (only the passes this call reaches)
        plan = []  # per step: (draw seed, [(rows to fetch, counted?)] of this rank's micro-batches)
        for k in range(skip, count):
            repeat, j = divmod(k, per_pass)
            if repeat not in orders:
                orders = {repeat: epoch_order(len(stream), seed, epoch, name, repeat).split(batch_size)}
            rows = orders[repeat][j]
            parts = rows.tensor_split(self.world_size)[self.rank].tensor_split(self.accum)
            plan.append(
                (
                    order_seed(seed, epoch, name) * 7_919 + k,
                    [(p if len(p) else rows[:1], len(p) > 0) for p in parts],
                )
            )
        seen = self.seen.setdefault(name, {}).setdefault(epoch, [])
        for draw, parts in plan:  # draw: the augmentation / pairing seed of this step
            micro, counted = [], []
            for rows, real in parts:
                batch = stream.get(rows, seed=draw)
                micro.append(
                    {key: v.to(self.device) if torch.is_tensor(v) else v for key, v in batch.items()}
                )
                counted.append(int(batch["labels"].shape[0]) if real else 0)  # a stand-in counts 0
                seen.extend(rows.tolist() if real else [])
            total = self.sum_across_ranks(float(sum(counted)))  # counted rows of the whole global batch
            for batch, n in zip(micro, counted):
                batch["share"] = n / total
            yield micro

    def fingerprint(self, model) -> list[str]:
        """sha256 of the weights each rank holds (its ZeRO-3 partition, or the whole model), one per rank."""
        h = hashlib.sha256()
        for p in self.unwrap(model).parameters():
            t = getattr(p, "ds_tensor", p).detach().cpu().contiguous()
            h.update(t.view(torch.uint8).numpy().tobytes())
        return self.gather_object(h.hexdigest())

    def num_batches(self, stream, batch_size: int) -> int:
        return -(-len(stream) // batch_size)

    def sum_across_ranks(self, value: float | list[float]) -> float | list[float]:
        """Sum over ranks (one all-reduce for a list)."""
        return value

    @property
    def seen(self) -> dict:
        """stream -> epoch -> the stream rows this rank trained on (stand-ins excluded)."""
        if not hasattr(self, "_seen"):
            self._seen = {}
        return self._seen
