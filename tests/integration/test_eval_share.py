"""Evaluation split by rank for real: 2 processes over gloo on CPU (torch.distributed, file:// rendezvous),
a tiny Llama and real TOFU rows. Each rank scores and generates for its share of every set only (the shares
are disjoint and cover every row), and the metrics every rank returns are one process's, exactly: the
shares are whole batches of the one-process batching, so every row meets the same kernels on the same
neighbours. (The image task's split is checked with simulated ranks: tests/unit/test_eval_share.py.)"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.data.text import QAFormatter, TextData
from engine.data.tofu import TofuData
from engine.eval import shard
from engine.eval.text import evaluate_text
from engine.eval.tofu import evaluate_tofu
from tests.conftest import TOFU

WORLD = 2
SETTINGS = {"batch_size": 3, "max_new_tokens": 4}


class GlooRanks:
    """The backend surface evaluation uses, on the default process group."""

    zero_stage = None

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather_object(self, obj) -> list:
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _rows(name: str, n: int, skip: int = 0) -> list[dict]:
    return [json.loads(line) for line in (TOFU / f"{name}.jsonl").read_text().splitlines()[skip : skip + n]]


def sets() -> tuple[TofuData, TextData]:
    """TOFU sets of awkward sizes for batches of 3 on 2 ranks, and the same rows as text pairs."""
    forget = _rows("forget10_perturbed", 7)
    for i, row in enumerate(forget):
        row["id"] = 3600 + i
    holdout = _rows("holdout10", 5)
    tofu = TofuData("forget10", 10, 1, full=[], forget=forget, retain=[], holdout=holdout, forget_eval=forget,
                    retain_eval=_rows("retain_perturbed", 4), real_authors=_rows("real_authors_perturbed", 3),
                    world_facts=_rows("world_facts_perturbed", 2))  # fmt: skip
    qa = lambda rows, tag: [{"id": f"{tag}{i}", "question": r["question"], "answer": r["answer"]}  # noqa: E731
                            for i, r in enumerate(rows)]  # fmt: skip
    text = TextData(forget=qa(forget, "f"), retain=qa(_rows("retain_perturbed", 8, 4), "r"),
                    holdout=qa(holdout, "h"), kind="ids", description="test", documents=False)  # fmt: skip
    return tofu, text


def evaluate_both(model_dir: Path, backend) -> tuple[dict, int]:
    """The TOFU and the text evaluation of the tiny model (JSON round-tripped, as a cache would hold them),
    and how many rows went through the model's forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [0]
    model.register_forward_pre_hook(
        lambda m, args, kwargs: rows.__setitem__(0, rows[0] + kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    fmt = QAFormatter(tok, max_length=256, chat_template="off")
    tofu, text = sets()
    res = {
        "tofu": evaluate_tofu(model, tok, fmt, tofu, backend=backend, **SETTINGS),
        "text": evaluate_text(model, fmt, text, backend=backend, **SETTINGS),
    }
    return json.loads(json.dumps(res, default=float)), rows[0]


def _rank(rank: int, init: str, model_dir: Path, out: Path) -> None:
    """One rank: evaluate with the gloo group, recording the rows of every share it ran."""
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        shares = []
        original = shard.share

        def recorded(n: int, batch_size: int, r: int, world_size: int) -> shard.Share:
            s = original(n, batch_size, r, world_size)
            shares.append({"n": n, "rows": s.rows[: s.real], "batches": s.batches})
            return s

        shard.share = recorded  # map_rows looks it up at call time
        metrics, rows = evaluate_both(model_dir, GlooRanks())
        (out / f"rank{rank}.json").write_text(
            json.dumps({"metrics": metrics, "shares": shares, "rows": rows})
        )
    finally:
        dist.destroy_process_group()
    # Its result written, the rank leaves without C++ static destructors: at interpreter exit a finished rank
    # was once aborted under load ("terminate called without an active exception", SIGABRT) after its work.
    os._exit(0)


@pytest.mark.full  # about 30 s alone (two processes importing torch and transformers), minutes on a busy machine
def test_two_gloo_ranks_each_evaluate_their_share_and_return_one_process_metrics(tiny_lm, tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank, args=(init, tiny_lm, tmp_path), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    single, single_rows = evaluate_both(tiny_lm, None)

    for r in ranks:
        assert r["metrics"] == single  # every number and per-example list, on every rank
    assert single["tofu"]["forget_Q_A_ROUGE"] is not None and single["text"]["mia_min_k"] is not None

    # every scoring / generation pass was split: the ranks' rows are disjoint and cover the set, and both
    # ran the same number of batches (what ZeRO-3's collective forwards need)
    a, b = (r["shares"] for r in ranks)
    assert len(a) == len(b) > 10
    for sa, sb in zip(a, b, strict=True):
        assert sa["n"] == sb["n"] and sa["batches"] == sb["batches"]
        assert not set(sa["rows"]) & set(sb["rows"])
        assert sorted(sa["rows"] + sb["rows"]) == list(range(sa["n"]))
    assert any(s["rows"] for s in a) and any(s["rows"] for s in b)
    # and the model really ran on a share only: about half the rows each (the stand-ins add a few)
    assert all(r["rows"] < 0.7 * single_rows for r in ranks), (single_rows, [r["rows"] for r in ranks])
