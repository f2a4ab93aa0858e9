"""Evaluation split by rank (engine/eval/shard.py): each rank runs whole batches of the rows, every row once,
the same number of batches on every rank, and the gathered results are one process's, bit for bit.

Several ranks are simulated by threads, one per rank, each with its own copy of the model, joined by a
fake backend whose ``gather_object`` waits for every rank (as ``all_gather_object`` does)."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.data.text import QAFormatter, TextData
from engine.data.tofu import TofuData
from engine.data.vision import ImageSet, ImageTransform, UnlearningData
from engine.eval import tofu as T
from engine.eval.shard import Share, is_shared, map_rows, share
from engine.eval.text import evaluate_text
from engine.tasks.image_classification import ImageClassification
from engine.testing import build_tiny_llama, build_tiny_tokenizer
from tests.conftest import TOFU

# ---- fake ranks ----------------------------------------------------------------------------------------


class _Group:
    """What the ranks of one simulated run share: a slot each, and a barrier."""

    def __init__(self, world_size: int):
        self.slots: list = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=120)


class FakeRank:
    """The backend surface evaluation uses: rank, world_size, gather_object (every rank's object, on all)."""

    zero_stage = None

    def __init__(self, group: _Group, rank: int):
        self.group, self.rank, self.world_size = group, rank, len(group.slots)
        self.gathers = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather_object(self, obj) -> list:
        self.gathers += 1
        self.group.slots[self.rank] = obj
        self.group.barrier.wait()
        out = list(self.group.slots)
        self.group.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return out


def run_ranks(world_size: int, work: Callable[[FakeRank], object]) -> list:
    """``work(backend)`` on ``world_size`` threads, one per rank; each rank's return value, in rank order."""
    group = _Group(world_size)
    results: list = [None] * world_size
    errors: list[BaseException] = []

    def one(rank: int) -> None:
        try:
            results[rank] = work(FakeRank(group, rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)
            group.barrier.abort()  # the other ranks would wait at the next gather forever

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


class ForwardCounter:
    """Rows through the model's forward (generation steps included), per model copy."""

    def __init__(self, model: torch.nn.Module):
        self.rows = 0
        self.calls = 0
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", kwargs.get("pixel_values", args[0] if args else None))
        self.calls += 1
        self.rows += 0 if ids is None else int(ids.shape[0])


# ---- the share helper ----------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 11, 12, 13])
def test_shares_cover_every_row_once_in_whole_batches_with_equal_batch_counts(n, batch_size, world_size):
    shares = [share(n, batch_size, r, world_size) for r in range(world_size)]
    real = [s.rows[: s.real] for s in shares]
    assert sum(real, []) == list(range(n))  # every row once, contiguous shares in rank order
    batches = -(-n // batch_size)
    assert {s.batches for s in shares} == {-(-batches // world_size)}
    whole = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    for s in shares:
        assert s.rows[s.real :] in ([], [0]), "at most one stand-in, of one row"
        # what the caller runs, cutting the rows into batches: the same number on every rank, the real ones
        # being batches of one process (same rows together) and the stand-in a batch of its own
        cut = [s.rows[i : i + batch_size] for i in range(0, len(s.rows), batch_size)]
        assert len(cut) == s.batches
        own = -(-s.real // batch_size)
        assert all(c in whole for c in cut[:own])
        assert cut[own:] == ([[0]] if s.real < len(s.rows) else [])
    own_batches = [-(-s.real // batch_size) for s in shares]
    assert max(own_batches) - min(own_batches) <= 1  # the load differs by one batch at most


def test_the_partial_last_batch_belongs_to_a_rank_that_needs_no_stand_in():
    # 5 batches (the last of 1 row) on 2 ranks: rank 0 runs 2 whole batches + a stand-in, rank 1 the rest
    assert share(9, 2, 0, 2) == Share(rows=[0, 1, 2, 3, 0], real=4, batches=3)
    assert share(9, 2, 1, 2) == Share(rows=[4, 5, 6, 7, 8], real=5, batches=3)
    # fewer batches than ranks: the first rank only stands in
    assert share(3, 4, 0, 2) == Share(rows=[0], real=0, batches=1)
    assert share(3, 4, 1, 2) == Share(rows=[0, 1, 2], real=3, batches=1)
    with pytest.raises(ValueError):
        share(3, 0, 0, 1)
    with pytest.raises(ValueError):
        share(3, 2, 2, 2)


def test_is_shared_only_with_several_ranks():
    assert not is_shared(None)
    assert not is_shared(SimpleNamespace(world_size=1))
    assert is_shared(SimpleNamespace(world_size=2))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_map_rows_runs_each_share_once_and_restores_the_order(world_size):
    n, bs = 11, 3
    seen: dict[int, list[list[int]]] = {}

    def work(backend: FakeRank) -> list[str]:
        def run(rows: list[int]) -> list[str]:
            seen.setdefault(backend.rank, []).append(list(rows))
            return [f"row {i}" for i in rows]

        return map_rows(run, n, bs, backend)

    results = run_ranks(world_size, work)
    assert all(r == [f"row {i}" for i in range(n)] for r in results)  # every rank gets every row
    assert all(len(calls) == 1 for calls in seen.values())
    owned = [share(n, bs, r, world_size) for r in range(world_size)]
    assert [seen[r][0] for r in range(world_size)] == [s.rows for s in owned]


def test_map_rows_without_a_backend_is_one_call_on_every_row():
    calls = []
    assert map_rows(lambda rows: calls.append(rows) or [i * 2 for i in rows], 5, 2, None) == [0, 2, 4, 6, 8]
    assert calls == [[0, 1, 2, 3, 4]]


def test_map_rows_refuses_a_run_that_loses_rows():
    with pytest.raises(RuntimeError, match="results"):
        run_ranks(2, lambda b: map_rows(lambda rows: rows[:-1], 6, 2, b))


# ---- the evaluations through fake ranks equal one process ---------------------------------------------


def _rows(name: str, n: int, skip: int = 0) -> list[dict]:
    lines = (TOFU / f"{name}.jsonl").read_text().splitlines()[skip : skip + n]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama, its formatter, and TOFU rows in sets of awkward sizes for batches of 2."""
    if not TOFU.exists():
        pytest.fail(f"TOFU not found at {TOFU}: the tests need ../shared/data beside the checkout")
    forget = _rows("forget10_perturbed", 5)
    for i, row in enumerate(forget):
        row["id"] = 3600 + i
    sets = {
        "retain": _rows("retain_perturbed", 3),
        "ra": _rows("real_authors_perturbed", 3),
        "wf": _rows("world_facts_perturbed", 4),
        "holdout": _rows("holdout10", 5),
    }
    texts = [t for rows in [forget, *sets.values()] for r in rows
             for t in (r["question"], r["answer"], r.get("paraphrased_answer", ""), *r.get("perturbed_answer", []))]  # fmt: skip
    tok = build_tiny_tokenizer(texts)
    model = build_tiny_llama(len(tok)).eval()
    fmt = QAFormatter(tok, max_length=512, chat_template="off")
    tofu = TofuData("forget10", 10, 1, full=[], forget=forget, retain=[], holdout=sets["holdout"],
                    forget_eval=forget, retain_eval=sets["retain"], real_authors=sets["ra"],
                    world_facts=sets["wf"])  # fmt: skip
    qa = lambda rows, tag: [{"id": f"{tag}{i}", "question": r["question"], "answer": r["answer"]}  # noqa: E731
                            for i, r in enumerate(rows)]  # fmt: skip
    text = TextData(forget=qa(forget, "f"), retain=qa(_rows("retain_perturbed", 7, 3), "r"),
                    holdout=qa(sets["holdout"], "h"), kind="ids", description="test", documents=False)  # fmt: skip
    return model, tok, fmt, tofu, text


def _shared(world_size: int, model, evaluate: Callable) -> tuple[list[dict], list[ForwardCounter]]:
    """``evaluate(model copy, backend)`` on every fake rank: the results, and each rank's forward count."""
    copies = [copy.deepcopy(model) for _ in range(world_size)]
    counters = [ForwardCounter(m) for m in copies]
    return run_ranks(world_size, lambda b: evaluate(copies[b.rank], b)), counters


@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluate_tofu_on_fake_ranks_equals_one_process(tiny, world_size):
    model, tok, fmt, data, _ = tiny
    kw = {"batch_size": 2, "max_new_tokens": 4}
    alone = copy.deepcopy(model)
    single_count = ForwardCounter(alone)
    single = T.evaluate_tofu(alone, tok, fmt, data, **kw)
    results, counts = _shared(
        world_size, model, lambda m, b: T.evaluate_tofu(m, tok, fmt, data, backend=b, **kw)
    )
    for res in results:
        assert res == single  # every number and every per-example list, exactly
    # the work really is split: each rank ran about 1/world_size of the rows through the model
    assert all(c.rows < single_count.rows * 0.75 for c in counts)


@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluate_text_on_fake_ranks_equals_one_process(tiny, world_size):
    model, tok, fmt, _, data = tiny
    kw = {"batch_size": 2, "max_new_tokens": 6, "max_rows": 6}
    alone = copy.deepcopy(model)
    single_count = ForwardCounter(alone)
    single = evaluate_text(alone, fmt, data, **kw)
    assert single["mia_min_k"] is not None and single["forget_verbatim_rouge"] is not None
    results, counts = _shared(world_size, model, lambda m, b: evaluate_text(m, fmt, data, backend=b, **kw))
    for res in results:
        assert res == single
    assert all(c.rows < single_count.rows * 0.75 for c in counts)


def test_generation_stays_batched_on_each_rank(tiny):
    """A rank generates its share in batches of batch_size (one generate call per batch), not row by row."""
    model, tok, fmt, data, _ = tiny
    questions = [r["question"] for r in data.forget_eval + data.world_facts]  # 9 prompts, batches of 4
    single = T.generate_answers(model, fmt, questions, batch_size=4, max_new_tokens=3)
    calls: dict[int, int] = {}

    def work(b: FakeRank) -> list[str]:
        m = copy.deepcopy(model)
        original = m.generate

        def counted(*args, **kwargs):
            calls[b.rank] = calls.get(b.rank, 0) + 1
            return original(*args, **kwargs)

        m.generate = counted
        return T.generate_answers(m, fmt, questions, batch_size=4, max_new_tokens=3, backend=b)

    assert run_ranks(2, work) == [single, single]
    assert calls == {0: 2, 1: 2}  # 3 batches on 2 ranks: 1 + a stand-in, and 2


# ---- the image task ------------------------------------------------------------------------------------


def _image_set(labels: list[int], seed: int, tag: str) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.tensor(labels, dtype=torch.long), [f"{tag}{i}" for i in range(len(labels))])


@pytest.fixture(scope="module")
def image_task():
    """The image task on random images of 3 classes (class 0 forgotten), an All-CNN, batches of 4."""
    from engine.models.vision import build_vision_model

    torch.manual_seed(0)
    data = UnlearningData(
        forget=_image_set([0] * 13, 1, "f"),
        retain=_image_set([1, 2] * 10 + [1], 2, "r"),
        val=_image_set([0, 1, 2] * 3, 3, "v"),
        forget_val=_image_set([0] * 5, 4, "fv"),
        test=_image_set([0] * 11 + [1, 2] * 7, 5, "t"),
        class_names=["a", "b", "c"],
        forget_classes=[0],
        forget_kind="class",
        description="class 0",
    )
    task = ImageClassification.__new__(ImageClassification)  # no dataset to read: the parts evaluate uses
    task.cfg = SimpleNamespace(eval=SimpleNamespace(batch_size=4, mia_seed=0))
    task.data, task.transform = data, ImageTransform([0.5] * 3, [0.25] * 3)
    model = build_vision_model("allcnn", num_labels=3, width=0.25).eval()
    return task, model


@pytest.mark.parametrize("world_size", [2, 3])
def test_image_evaluation_on_fake_ranks_equals_one_process(image_task, world_size):
    task, model = image_task
    alone = copy.deepcopy(model)
    single_count = ForwardCounter(alone)
    single = task.evaluate(alone, "cpu")
    assert np.isfinite(single["mia"]) and np.isfinite(single["mia_efficacy"])
    results, counts = _shared(world_size, model, lambda m, b: task.evaluate(m, "cpu", backend=b))
    for res in results:
        assert res == single
    assert all(c.rows < single_count.rows * 0.75 for c in counts)
