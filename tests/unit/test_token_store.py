"""The token store (engine/data/store.py) the Ray workers read their rows from: real TOFU rows, tokenized,
written in any order, read back by index as the very batches the in-memory stream gives."""

from __future__ import annotations

import json

import pytest
import torch

from engine.data.store import TokenStore, write_token_store
from engine.data.text import QAFormatter, TextStream
from engine.models.causal_lm import load_tokenizer
from tests.conftest import TOFU


@pytest.fixture(scope="module")
def encoded(tiny_lm):
    tok = load_tokenizer(str(tiny_lm))
    rows = [json.loads(line) for line in (TOFU / "forget10.jsonl").read_text().splitlines()[:30]]
    formatter = QAFormatter(tok, max_length=96)
    return rows, formatter, tok.pad_token_id


def _batches(formatter, rows, order, size=7):
    for start in range(0, len(order), size):
        part = order[start : start + size]
        enc = [formatter.encode(rows[i]["question"], rows[i]["answer"]) for i in part]
        yield {"row": part, "input_ids": [e["input_ids"] for e in enc], "labels": [e["labels"] for e in enc]}


def test_rows_written_in_any_order_read_back_as_the_in_memory_stream_batches(encoded, tmp_path):
    rows, formatter, pad = encoded
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    write_token_store(tmp_path / "store", len(rows), _batches(formatter, rows, order))
    store, memory = TokenStore(tmp_path / "store", pad), TextStream(rows, formatter, pad)
    assert len(store) == len(memory) == 30
    for wanted in ([0], [29, 3, 17], list(range(30))):
        a, b = store.get(torch.tensor(wanted)), memory.get(torch.tensor(wanted))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), wanted
    assert not (tmp_path / "store.tmp").exists()


def test_a_missing_or_repeated_row_is_refused_and_nothing_is_published(encoded, tmp_path):
    rows, formatter, _ = encoded
    with pytest.raises(ValueError, match="1 of 30 rows were never written"):
        write_token_store(tmp_path / "a", 30, _batches(formatter, rows, list(range(29))))
    with pytest.raises(ValueError, match="row 3 is out of range, repeated"):
        write_token_store(tmp_path / "b", 30, _batches(formatter, rows, [0, 1, 2, 3, 3]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(FileNotFoundError, match="not a complete token store"):
        TokenStore(tmp_path / "a.tmp", 0)


def _assert_same_batches(folder, rows, formatter, pad):
    store, memory = TokenStore(folder, pad), TextStream(rows, formatter, pad)
    assert len(store) == len(memory)
    everything = torch.arange(len(rows))
    a, b = store.get(everything), memory.get(everything)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_set_of_one_block_is_tokenized_in_the_driver_without_ray_data(encoded, tmp_path, monkeypatch):
    """write_stores (the Ray driver) tokenizes a set of at most one block itself, without Ray Data (made to
    fail here if it is reached): the same store as the in-memory stream's batches."""
    import engine.launch.ray_train as ray_train

    rows, formatter, pad = encoded

    def no_ray_data(*args, **kwargs):
        raise AssertionError("Ray Data was started for a set of one block")

    monkeypatch.setattr(ray_train, "tokenize_to_store", no_ray_data)
    stores = ray_train.write_stores({"forget": rows}, formatter, tmp_path / "run", rows_per_block=30)
    assert stores == {"forget": str(tmp_path / "run.tokens" / "forget")}
    _assert_same_batches(stores["forget"], rows, formatter, pad)


def test_rows_written_a_chunk_at_a_time_read_back_as_the_in_memory_stream(encoded, tmp_path):
    from engine.data.store import write_rows

    rows, formatter, pad = encoded
    write_rows(tmp_path / "store", rows, formatter.encode_row, chunk_rows=4)
    store, memory = TokenStore(tmp_path / "store", pad), TextStream(rows, formatter, pad)
    wanted = torch.tensor([29, 3, 17, 4, 0])
    a, b = store.get(wanted), memory.get(wanted)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_reads_forget_and_retain_rows_from_stores_and_removes_them(tiny_lm, tmp_path, monkeypatch):
    """`unlearn run` on text: the retain set is never encoded in memory (the task's in-memory retain stream is
    never asked for), every batch comes from OUTPUT.tokens, and that folder is gone when the run ends."""
    from engine.cli import main
    from engine.tasks.causal_lm import CausalLM
    from engine.testing import tofu_overrides

    text, get, opened = CausalLM._text, TokenStore.get, []

    def text_but_retain(self, name):
        assert name != "retain", "the whole retain set was encoded in memory"
        return text(self, name)

    def recording_get(self, rows, seed=0):
        opened.append(len(rows))
        return get(self, rows, seed)

    monkeypatch.setattr(CausalLM, "_text", text_but_retain)
    monkeypatch.setattr(TokenStore, "get", recording_get)
    out = tmp_path / "out"
    assert main(["run", "configs/tofu.yaml", *tofu_overrides(tiny_lm, tmp_path, output_dir=out,
                                                             **{"eval.reference": "null"})]) == 0  # fmt: skip
    assert opened  # the training batches came from the stores
    assert not out.with_name("out.tokens").exists()
    assert (out / "model").is_dir()
