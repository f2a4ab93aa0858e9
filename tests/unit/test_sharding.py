"""How a global batch becomes each rank's micro-batches (engine/backends/base.py), with ranks simulated
as threads and a real all-reduce (a barrier-synchronised sum) between them."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.backends.base import Backend


class Stream:
    """Row i has (i % 3) + 1 counted labels (answer tokens of different lengths)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def get(self, rows: torch.Tensor, seed: int = 0) -> dict:
        labels = torch.cat([torch.full(((int(i) % 3) + 1,), int(i)) for i in rows])
        return {"labels": labels, "rows": rows.clone()}


class ThreadRank(Backend):
    def __init__(self, rank: int, world: int, accum: int, shared: dict):
        self.rank, self.world_size, self.accum, self.shared = rank, world, accum, shared

    def sum_across_ranks(self, value: float) -> float:
        s = self.shared
        s["values"][self.rank] = value
        s["barrier"].wait()
        total = sum(s["values"])
        s["barrier"].wait()  # nobody overwrites a value before every rank has read the sum
        return total


def run_ranks(n: int, batch_size: int, world: int, accum: int, epoch: int = 1) -> list[list[list[dict]]]:
    shared = {"values": [0.0] * world, "barrier": threading.Barrier(world)}
    ranks = [ThreadRank(r, world, accum, shared) for r in range(world)]
    out: list = [None] * world

    def work(r):
        out[r] = list(ranks[r].batches(Stream(n), batch_size, seed=3, epoch=epoch, name="forget"))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


@pytest.mark.parametrize(
    "n,batch_size,world,accum",
    [(20, 4, 2, 1), (23, 8, 2, 2), (5, 4, 2, 3), (3, 8, 4, 1), (17, 5, 3, 2)],
)
def test_each_rank_trains_on_a_distinct_shard_and_together_they_cover_the_epoch(n, batch_size, world, accum):
    ranks = run_ranks(n, batch_size, world, accum)
    steps = -(-n // batch_size)
    seen = []
    for rank_steps in ranks:
        assert len(rank_steps) == steps  # the same number of optimizer steps on every rank
        assert all(len(micro) == accum for micro in rank_steps)  # and of micro-batches per step
        seen.append({int(i) for micro in rank_steps for b in micro if b["share"] > 0 for i in b["rows"]})
    for a in range(world):
        for b in range(a + 1, world):
            assert not seen[a] & seen[b], "two ranks trained on the same row"
    assert set().union(*seen) == set(range(n))
    assert sum(len(s) for s in seen) == n


@pytest.mark.parametrize("n,batch_size,world,accum", [(23, 8, 2, 2), (5, 4, 2, 3), (17, 5, 3, 2)])
def test_shares_weight_each_micro_batch_by_its_counted_rows_of_the_global_batch(n, batch_size, world, accum):
    ranks = run_ranks(n, batch_size, world, accum)
    single = run_ranks(n, batch_size, 1, 1)[0]
    for k, one in enumerate(single):
        (whole,) = one
        assert whole["share"] == 1.0
        parts = [b for rank in ranks for b in rank[k]]
        assert sum(b["share"] for b in parts) == pytest.approx(1.0)
        for b in parts:
            if b["share"] > 0:
                assert b["share"] == pytest.approx(len(b["labels"]) / len(whole["labels"]))
        # the rows of the global batch are the single process's rows, in the same order
        real = torch.cat([b["rows"] for rank in ranks for b in rank[k] if b["share"] > 0])
        assert sorted(real.tolist()) == sorted(whole["rows"].tolist())


def test_a_rank_without_rows_gets_a_zero_weight_stand_in():
    # 3 rows over 4 ranks: rank 3 has nothing, but must still run a forward (ZeRO-3 gathers collectively)
    ranks = run_ranks(3, 8, 4, 1)
    (micro,) = ranks[3][0]
    assert micro["share"] == 0.0 and len(micro["rows"]) == 1
