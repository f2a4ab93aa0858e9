"""Any text data for causal LMs (engine/data/text.py, engine/eval/text.py): document windows with stable ids,
every forget kind and its refusals, the verbatim ROUGE on a hand-made example, TOFU rows forgotten by id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import load_config
from engine.data.text import IGNORE, DocumentFormatter, prepare_text
from engine.data.tofu import prepare_tofu
from engine.errors import DataError
from engine.eval.text import token_mean, verbatim_split
from engine.eval.tofu import rouge_l_recall
from engine.testing import build_tiny_tokenizer
from tests.conftest import TOFU

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak tree".split()


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer([" ".join(WORDS)] * 20, vocab_size=300)


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus(tmp_path: Path) -> Path:
    docs = [{"author": a, "text": " ".join(WORDS[i : i + 6])} for i, a in enumerate("abcabcab")]
    return write(tmp_path / "corpus.jsonl", docs)


def text_cfg(tmp_path: Path, **extra):
    over = {"task": "causal_lm", "data.dataset": str(corpus(tmp_path)), "data.text_column": "text",
            "data.max_length": "64", **extra}  # fmt: skip
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def prepare(cfg, tok):
    return prepare_text(cfg.data, cfg.forget, cfg.holdout, DocumentFormatter(tok, cfg.data.max_length))


def test_a_document_of_two_and_a_half_windows_gives_three_examples_with_stable_ids(tok, tmp_path):
    text, n = "", 0
    for word in (
        WORDS * 3
    ):  # a document of 5m tokens (its end-of-sequence included): windows of 2m are 2.5 of them
        text = f"{text} {word}".strip()
        n = len(tok(text)["input_ids"]) + 1
        if n % 5 == 0 and n >= 10:
            break
    size = 2 * n // 5
    fmt = DocumentFormatter(tok, max_length=size)
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    windows = fmt.windows(text)
    assert [len(w) for w in windows] == [size, size, size // 2] and sum(windows, []) == ids
    path = write(tmp_path / "doc.jsonl", [{"text": "too short"}, {"text": text}])
    over = ["task=causal_lm", f"data.dataset={path}", "data.text_column=text", f"data.max_length={size}",
            "forget.kind=ids", "forget.ids=[1]"]  # fmt: skip
    cfg = load_config(None, over)
    runs = [prepare_text(cfg.data, cfg.forget, cfg.holdout, DocumentFormatter(tok, size)) for _ in range(2)]
    assert [r["id"] for r in runs[0].forget] == ["1:0", "1:1", "1:2"]  # ROW:WINDOW
    assert runs[0].forget == runs[1].forget and runs[0].retain == runs[1].retain  # stable across runs
    assert [r["input_ids"] for r in runs[0].forget] == windows
    assert runs[0].forget_summary()["rows"] == 1 and runs[0].full == runs[0].retain + runs[0].forget
    # a document encodes with the loss on every token
    enc = fmt.encode_row(runs[0].forget[0])
    assert enc["labels"] == enc["input_ids"] == windows[0]


def test_each_forget_kind_selects_its_rows(tok, tmp_path):
    by_id = prepare(text_cfg(tmp_path, **{"forget.kind": "ids", "forget.ids": "[0,4]"}), tok)
    assert sorted({r["source_id"] for r in by_id.forget}) == [0, 4]
    assert {r["source_id"] for r in by_id.retain} == {1, 2, 3, 5, 6, 7}
    where = prepare(text_cfg(tmp_path, **{"forget.kind": "where", "forget.where": "{author: b}"}), tok)
    assert sorted({r["source_id"] for r in where.forget}) == [1, 4, 7]
    either = prepare(text_cfg(tmp_path, **{"forget.kind": "where", "forget.where": "{author: [a, c]}"}), tok)
    assert sorted({r["source_id"] for r in either.forget}) == [0, 2, 3, 5, 6]
    rnd = [prepare(text_cfg(tmp_path, **{"forget.kind": "random", "forget.fraction": "0.25", "forget.seed": s}), tok)
           for s in (0, 0, 1)]  # fmt: skip
    assert len({r["source_id"] for r in rnd[0].forget}) == 2 and rnd[0].forget == rnd[1].forget
    apart = write(tmp_path / "forget.jsonl", [{"author": "z", "text": "seven wise owls and a lazy fox"}])
    sep = prepare(text_cfg(tmp_path, **{"forget.kind": "dataset", "forget.dataset": str(apart)}), tok)
    assert {r["source_id"] for r in sep.forget} == {"forget:0"} and len(sep.retain) == 8  # all training data
    assert sep.full == sep.retain + sep.forget  # what the Original is trained on; Retrain on sep.retain
    holdout = write(tmp_path / "holdout.jsonl", [{"author": "h", "text": "an old oak tree"}])
    held = prepare(
        text_cfg(tmp_path, **{"forget.kind": "ids", "forget.ids": "[0]", "holdout.dataset": str(holdout)}),
        tok,
    )
    assert [r["id"] for r in held.holdout] == ["holdout:0:0"]


@pytest.mark.parametrize(
    "extra, named",
    [({"forget.kind": "where", "forget.where": "{author: nobody}"}, "matches no row of data.dataset"),
     ({"forget.kind": "where", "forget.where": "{writer: a}"}, "names 'writer', which is not a column"),
     ({"forget.kind": "ids", "forget.ids": "[3, 99]"}, "1 of 2 forget ids are not rows of data.dataset"),
     ({"forget.kind": "dataset", "forget.dataset": "OVERLAP"}, "1 rows of forget.dataset are also in data.dataset"),
     ({"forget.kind": "random", "forget.fraction": "0.99"}, "nothing would be retained"),
     ({"forget.kind": "ids", "forget.ids": "[0]", "data.text_column": "body"}, "has no column 'body'")],
)  # fmt: skip
def test_a_forget_set_that_cannot_be_honoured_is_refused(extra, named, tok, tmp_path):
    if extra.get("forget.dataset") == "OVERLAP":  # a forget corpus holding a training document
        extra["forget.dataset"] = str(write(tmp_path / "f.jsonl", [{"text": " ".join(WORDS[2:8])}]))
    with pytest.raises(DataError, match=named):
        prepare(text_cfg(tmp_path, **extra), tok)


def test_prompt_answer_pairs_count_the_answer_only(tok, tmp_path):
    path = write(
        tmp_path / "qa.jsonl",
        [{"q": "who jumps", "a": "the quick brown fox"}, {"q": "who watch", "a": "owls"}],
    )
    cfg = load_config(None, ["task=causal_lm", f"data.dataset={path}", "data.prompt_column=q", "data.answer_column=a",
                             "forget.kind=ids", "forget.ids=[1]"])  # fmt: skip
    from engine.data.text import QAFormatter

    fmt = QAFormatter(tok, 64)
    data = prepare_text(cfg.data, cfg.forget, cfg.holdout, fmt)
    assert data.forget == [{"id": 1, "source_id": 1, "question": "who watch", "answer": "owls"}]
    enc = fmt.encode_row(data.retain[0])
    assert enc == fmt.encode("who jumps", "the quick brown fox") and enc["labels"][0] == IGNORE


def test_verbatim_rouge_on_a_hand_made_example():
    # the counted (loss) positions of a pair: 2..8; the second half starts at the 4th of the 7 counted tokens
    encoded = {"input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9], "labels": [IGNORE, IGNORE, 3, 4, 5, 6, 7, 8, 9]}
    assert verbatim_split(encoded) == ([1, 2, 3, 4, 5], [6, 7, 8, 9])
    document = {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}  # the first token is never predicted
    assert verbatim_split(document) == ([5, 6], [7, 8])
    # ROUGE-L recall: the longest common subsequence over the reference's tokens (stemmed, lower-cased)
    got = rouge_l_recall(["the cat sat", "a dog ran far away", "nothing alike"],
                         ["the cat sat on the mat", "the dog ran away", "the cat"])  # fmt: skip
    assert got == pytest.approx([3 / 6, 3 / 4, 0.0])
    assert token_mean([{"avg_nll": 2.0, "tokens": 1}, {"avg_nll": 1.0, "tokens": 3}]) == pytest.approx(1.25)


def test_tofu_forgets_single_rows_by_id():
    cfg = load_config(None, ["task=tofu", f"tofu.dataset={TOFU}", "tofu.num_authors=10", "forget.kind=ids",
                             "forget.ids=[3, 25, 3605]"])  # fmt: skip
    data = prepare_tofu(cfg.tofu, cfg.forget)
    assert [r["id"] for r in data.forget] == [3, 25, 3605]
    assert not {3, 25, 3605} & {r["id"] for r in data.retain} and len(data.retain) == 10 * 20 - 3
    # truth ratios need TOFU's perturbed answers: authors 0-19 and the forget split have them, row 25 too
    assert [r["id"] for r in data.forget_eval] == [3, 25, 3605]
    assert data.forget_summary()["split"] == "ids" and len(data.holdout) >= 1
    with pytest.raises(DataError, match="keeps \\(ids 0..179 and 3600..3619\\); not there: \\[5000\\]"):
        prepare_tofu(cfg.tofu, cfg.forget.model_copy(update={"ids": [5000]}))


def test_configs_text_needs_only_the_data_the_forget_set_the_holdout_and_the_model(tmp_path):
    """configs/text.yaml: each command its own folder, and `run` reads what `train` wrote."""
    over = [
        f"data.dataset={corpus(tmp_path)}",
        "forget.where={author: b}",
        f"holdout.dataset={tmp_path}/h.jsonl",
    ]
    train = load_config("configs/text.yaml", [*over, "model.base=BASE"], command="train")
    run = load_config("configs/text.yaml", over, command="run")
    # `train` fine-tunes model.base (the shipped config's: the hub's SmolLM2), `run` reads what it made
    assert (
        load_config("configs/text.yaml", over, command="train").model.path
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert train.model.path == "BASE"
    assert (train.output_dir, run.output_dir) == ("runs/text/train", "runs/text/run")
    assert run.model.path == "runs/text/train/original" and run.eval.reference == "runs/text/train/retrain"
    assert train.task == run.task == "causal_lm" and run.data.text_column == "text"


def test_a_hub_id_is_read_from_its_mirror_copy_and_offline_without_one_is_one_line(tmp_path, monkeypatch):
    from engine.data.sources import resolve

    (tmp_path / "cifar10").mkdir()
    (tmp_path / "acme" / "corpus").mkdir(parents=True)
    monkeypatch.setenv("UNLEARN_DATA_MIRROR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("uoft-cs/cifar10") == str(tmp_path / "cifar10")  # MIRROR/<name>, lower-cased
    assert resolve("acme/corpus") == str(tmp_path / "acme" / "corpus")  # MIRROR/<owner>/<name>
    assert resolve(str(tmp_path / "cifar10")) == str(tmp_path / "cifar10")  # a local path is itself
    with pytest.raises(DataError) as err:
        resolve("locuslab/TOFU", "tofu.dataset")
    assert "\n" not in str(err.value) and "'locuslab/TOFU'" in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value) and "UNLEARN_DATA_MIRROR/tofu" in str(err.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    from engine import provenance

    monkeypatch.setattr(provenance, "hub_reachable", lambda: True)
    assert resolve("locuslab/TOFU") == "locuslab/TOFU"  # the hub, when it may be reached and answers


def test_the_shipped_configs_read_our_copies_through_the_mirror():
    """configs name hub ids; the suite's UNLEARN_DATA_MIRROR (tests/conftest.py) maps them to the local copies."""
    from engine.data.sources import resolve

    demo, tofu = load_config("configs/demo.yaml"), load_config("configs/tofu.yaml")
    assert (demo.data.dataset, tofu.tofu.dataset) == ("uoft-cs/cifar10", "locuslab/TOFU")
    assert Path(resolve(demo.data.dataset)).is_dir() and Path(resolve(tofu.tofu.dataset)) == TOFU
