"""The MUSE preset (engine/data/muse.py) on the real MUSE-News copy, and its evaluation (engine/eval/muse.py):
the loader's counts, forget_subset and each refusal in one line; ROUGE-L F1, privleak_muse and the knowmem prompt
by hand; the suite's keys on a tiny Llama."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.config import load_config
from engine.data.muse import SPLITS, prepare_muse
from engine.data.text import DocumentFormatter
from engine.errors import DataError
from engine.eval import registry
from engine.eval.muse import cut_answer, evaluate_muse, knowmem_prompt, privleak_muse, rouge_l_f1
from engine.eval.tofu import privleak
from engine.testing import data_folder

NEWS = "muse-bench/MUSE-News"  # read through UNLEARN_DATA_MIRROR/muse-news, as a user offline does


def muse_cfg(**settings):
    overrides = [f"muse.{k}={json.dumps(v)}" for k, v in settings.items()]
    return load_config("configs/muse.yaml", ["muse.max_prompt_tokens=null", *overrides]).muse


@pytest.fixture(scope="module")
def fmt(tiny_lm) -> DocumentFormatter:
    return DocumentFormatter(AutoTokenizer.from_pretrained(tiny_lm), 64)


def test_the_loader_reads_the_real_copy_with_the_authors_counts(fmt):
    data = prepare_muse(muse_cfg(forget_subset=None, retain_subset=3, max_rows=None), fmt)
    assert data.forget_articles == list(range(889))  # raw/forget: 889 articles
    assert {r["source_id"] for r in data.retain} == {
        f"retain:{i}" for i in range(3)
    }  # privleak/retain2, no retain1
    assert len(data.verbmem) == len(data.knowmem_forget) == len(data.knowmem_retain) == 100
    assert len(data.knowmem_forget_icl) == len(data.knowmem_retain_icl) == 10
    assert (
        len(data.privleak_forget) == len(data.privleak_holdout) == 100
        and data.holdout == data.privleak_holdout
    )
    assert {"prompt", "gt"} <= set(data.verbmem[0]) and {"question", "answer"} <= set(data.knowmem_retain[0])
    # every window is at most max_length tokens and an article's windows give back its tokens, end of text included
    article = json.loads((data_folder("muse-news") / "raw" / "forget.json").read_text())[0]
    windows = [r["input_ids"] for r in data.forget if r["source_id"] == "forget:0"]
    assert max(map(len, windows)) == 64
    ids = fmt.tokenizer(article)["input_ids"] + [fmt.tokenizer.eos_token_id]
    assert sum(windows, []) == ids[: len(sum(windows, []))] and len(ids) - len(sum(windows, [])) <= 1
    assert "889 of 889 forget articles" in data.description


def test_forget_subset_keeps_the_first_articles_and_their_evaluation_rows(fmt):
    data = prepare_muse(muse_cfg(forget_subset=40, retain_subset=2, max_rows=None), fmt)
    articles = json.loads((data_folder("muse-news") / "raw" / "forget.json").read_text())
    assert data.forget_articles == list(range(40))
    assert {r["source_id"] for r in data.forget} == {f"forget:{i}" for i in range(40)}
    # verbmem prompts kept are those drawn from the 40 articles: fewer than MUSE's 100, each found in one
    assert 0 < len(data.verbmem) < 100
    assert all(any(r["prompt"][:200] in a for a in articles[:40]) for r in data.verbmem)
    assert 0 < len(data.privleak_forget) < 100
    capped = prepare_muse(muse_cfg(forget_subset=40, retain_subset=2, max_rows=3), fmt)
    assert len(capped.verbmem) == len(capped.knowmem_retain) == len(capped.privleak_holdout) == 3


def test_articles_named_by_id_and_those_an_earlier_version_forgot(fmt):
    """forget.kind=ids (a deletion request): the named articles are forgotten, with the evaluation rows drawn from
    them; an article of forget.earlier_ids is in neither set, and naming it again is refused."""
    from engine.data.muse import scored_articles

    cfg = muse_cfg(forget_subset=None, retain_subset=1, max_rows=None)
    ids = scored_articles(cfg, 4)
    assert len(ids) == 4
    articles = json.loads((data_folder("muse-news") / "raw" / "forget.json").read_text())
    fcfg = load_config("configs/muse.yaml", ["forget.kind=ids", f"forget.ids={json.dumps(ids[:2])}",
                                             f"forget.earlier_ids={json.dumps(ids[2:3])}"]).forget  # fmt: skip
    data = prepare_muse(cfg, fmt, fcfg)
    assert data.forget_articles == sorted(ids[:2]) and data.forget_summary()["articles"] == 2
    assert {r["source_id"] for r in data.forget} == {f"forget:{i}" for i in ids[:2]}
    kept = [articles[i] for i in ids[:2]]
    assert data.verbmem and all(any(r["prompt"][:200] in a for a in kept) for r in data.verbmem)
    again = fcfg.model_copy(update={"ids": ids[2:4]})
    with pytest.raises(DataError, match="forgotten by an earlier version"):
        prepare_muse(cfg, fmt, again)


def test_the_refusals_are_one_line(fmt, tmp_path):
    with pytest.raises(DataError) as err:
        prepare_muse(muse_cfg(forget_subset=890), fmt)
    assert "muse.forget_subset=890 is larger than the forget split (889 articles" in str(err.value)
    assert "\n" not in str(err.value)
    copy_ = tmp_path / "muse-news"
    shutil.copytree(data_folder("muse-news"), copy_)
    (copy_ / "knowmem" / "retain2_qa.json").unlink()
    with pytest.raises(DataError) as err:
        prepare_muse(muse_cfg(path=str(copy_)), fmt)
    message = str(err.value)
    assert (
        "knowmem/retain_qa is missing" in message
        and str(copy_ / "knowmem") in message
        and "\n" not in message
    )
    with pytest.raises(Exception) as err:  # an unknown corpus: the config's one-line error
        load_config("configs/muse.yaml", ["muse.corpus=poems"])
    assert "muse.corpus: Input should be 'news' or 'books'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(Exception) as err:
        load_config("configs/muse.yaml", ["forget.kind=random"])
    assert "not forget.kind=random" in str(err.value)


def test_a_renamed_split_is_read_through_the_one_mapping(fmt, tmp_path):
    """MUSE-Books renamed retain2_qa to retain_qa: either name is read as knowmem/retain_qa."""
    assert SPLITS[("knowmem", "retain_qa")] == ("retain_qa", "retain2_qa")
    renamed = tmp_path / "muse-news"
    shutil.copytree(data_folder("muse-news"), renamed)
    for name in ("retain2_qa", "retain2_qa_icl"):
        (renamed / "knowmem" / f"{name}.json").rename(renamed / "knowmem" / f"{name.replace('2', '')}.json")
    data = prepare_muse(muse_cfg(path=str(renamed), forget_subset=2, retain_subset=1), fmt)
    original = prepare_muse(muse_cfg(forget_subset=2, retain_subset=1), fmt)
    assert (
        data.knowmem_retain == original.knowmem_retain
        and data.knowmem_retain_icl == original.knowmem_retain_icl
    )


def test_rouge_l_f1_by_hand():
    # LCS of "the cat sat on the mat" and "the cat lay on a mat": the cat on mat = 4; P = 4/6, R = 4/6
    assert rouge_l_f1(["the cat lay on a mat"], ["the cat sat on the mat"]) == pytest.approx([4 / 6])
    # prediction "the cat" (2 tokens) against a 4-token reference: P = 1, R = 1/2, F1 = 2/3
    assert rouge_l_f1(["the cat"], ["the cat was black"]) == pytest.approx([2 / 3])
    assert rouge_l_f1(["dogs"], ["cats"]) == [0.0]


def test_privleak_muse_by_hand():
    # MUSE's AUC is 1 - ours: ours 0.9 (forget rows look familiar) and the reference's 0.5 -> (0.1 - 0.5) / 0.5
    assert privleak_muse(0.9, 0.5) == pytest.approx(-80.0)
    assert privleak_muse(0.6, 0.6) == pytest.approx(0.0)
    assert privleak_muse(0.7, 1.0) is None  # the reference's MUSE AUC is 0: the ratio is undefined
    assert privleak_muse(0.3, 0.4) == pytest.approx((0.7 - 0.6) / 0.6 * 100)
    # the same number as the TOFU formula (open-unlearning's privleak, MUSE's formula on 1 - AUC)
    assert privleak_muse(0.83, 0.55) == pytest.approx(privleak(0.83, 0.55), rel=1e-6)


def test_the_knowmem_prompt_is_muse_s():
    icl = [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    assert (
        knowmem_prompt(icl, "Q3?")
        == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q3?\nAnswer: "
    )
    assert knowmem_prompt([], "Q?") == "Question: Q?\nAnswer: "
    assert cut_answer("Paris\n\nQuestion: next") == "Paris" and cut_answer("42 Question: x") == "42"
    assert cut_answer("London\nQuestion: x") == "London"


def test_the_suite_produces_exactly_its_registered_metrics(tiny_lm, fmt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    data = prepare_muse(muse_cfg(forget_subset=2, retain_subset=1, max_rows=3), fmt)
    kw = {"batch_size": 4, "verbmem_max_new_tokens": 4, "knowmem_max_new_tokens": 4, "max_prompt_tokens": 48}
    alone = evaluate_muse(copy.deepcopy(model), fmt.tokenizer, data, **kw)
    assert set(alone) - {"per_example"} == registry.produced(registry.MUSE)
    assert alone["privleak_muse"] is None  # MUSE's privleak needs the reference's AUC
    ref = {**alone, "mia_min_k": 0.4}
    res = evaluate_muse(model, fmt.tokenizer, data, reference=ref, **kw)
    assert res["privleak_muse"] == pytest.approx(privleak_muse(res["mia_min_k"], 0.4))
    assert res["privleak"] == pytest.approx(privleak(res["mia_min_k"], 0.4))
    for key in (
        "forget_verbmem_ROUGE",
        "forget_knowmem_ROUGE",
        "retain_knowmem_ROUGE",
        "extraction_strength",
    ):
        assert 0.0 <= res[key] <= 1.0, key
    assert len(res["per_example"]["forget_verbmem_ROUGE_by_row"]) == 3


def test_muse_is_in_the_shipped_configs():
    assert Path("configs/muse.yaml").resolve() == Path("engine/configs/muse.yaml").resolve()
