"""Forget-data hygiene: after a run, no copy of a forget example (its question, answer, paraphrase or
perturbed answers), nor a text the model generated for a forget question, is left in what the engine
wrote: the output folder (and its ``.partial`` stage), the model folder (the engine caches its
evaluation there), the ``datasets`` cache, the temporary folder, or the log. Examples are named by id.

The run is a tiny SCRUB unlearning on real TOFU rows, in-process, with ``HF_DATASETS_CACHE`` and the
temporary folder pointed into the test's own folders so that everything it leaves can be read back."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import pytest

from engine.cli import main
from engine.config import load_config
from engine.data.tofu import prepare_tofu
from engine.testing import tofu_overrides

MIN_CHARS = 20  # shorter strings (names, "Yes.") could occur by chance; every TOFU answer is longer
CANARY = "forget-generation-canary"


def forget_texts(rows: list[dict]) -> set[str]:
    """Every string of the forget rows longer than MIN_CHARS: questions, answers, paraphrases, perturbations."""
    out: set[str] = set()
    for row in rows:
        for value in row.values():
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str) and len(text.strip()) > MIN_CHARS:
                    out.add(text.strip())
    return out


def leaks(folders: list[Path], texts: set[str]) -> dict[str, list[str]]:
    """file -> the texts (first 40 characters) found in its bytes, over every file under ``folders``."""
    needles = {t: t.encode() for t in texts}
    found: dict[str, list[str]] = {}
    for folder in folders:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = file.read_bytes()
            hits = [t[:40] for t, b in needles.items() if b in data]
            if hits:
                found[str(file)] = hits
    return found


def isolate_caches(mp: pytest.MonkeyPatch, root: Path) -> tuple[Path, Path]:
    """Point the datasets cache and the temporary folder into ``root``; returns (cache, tmp)."""
    import datasets

    cache, tmp = root / "hf_datasets", root / "tmp"
    cache.mkdir()
    tmp.mkdir()
    mp.setenv("HF_DATASETS_CACHE", str(cache))
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))  # read by datasets at import time
    mp.setenv("TMPDIR", str(tmp))
    mp.setattr(tempfile, "tempdir", str(tmp))
    return cache, tmp


def run_tofu(root: Path, tiny_lm: Path, mp: pytest.MonkeyPatch) -> dict:
    """A tiny SCRUB run whose forget generations carry a canary; returns what the checks need."""
    import engine.eval.tofu as tofu_eval

    cache, tmp = isolate_caches(mp, root)
    model = root / "model"  # a copy: the run writes its evaluation cache (tofu_eval.json) into model.path
    shutil.copytree(tiny_lm, model)
    extra = {
        "model.path": model,
        "output_dir": root / "out",
        "eval.reference": "null",
        "method": "scrub",
        "method.epochs": 1,
        "method.msteps": 1,
    }
    overrides = tofu_overrides(tiny_lm, root, **extra)
    data = prepare_tofu(load_config("configs/tofu.yaml", overrides).tofu)
    texts = forget_texts(data.forget) | forget_texts(data.forget_eval)
    forget_questions = {r["question"] for r in data.forget}

    real_generate = tofu_eval.generate_answers
    generated: list[str] = []

    def generate_answers(model, formatter, questions, **kw):
        # the model's answers to forget questions, marked so that any copy of them can be found
        gens = real_generate(model, formatter, questions, **kw)
        if set(questions) <= forget_questions:
            gens = [f"{CANARY}-{len(generated) + i:04d} {g}" for i, g in enumerate(gens)]
            generated.extend(gens)
        return gens

    mp.setattr(tofu_eval, "generate_answers", generate_answers)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = main(["run", "configs/tofu.yaml", *overrides])
    assert code == 0, log.getvalue()[-2000:]
    (root / "run.log").write_text(log.getvalue())
    out = root / "out"
    partial = out.with_name(out.name + ".partial")
    folders = [out, model, cache, tmp, root / "run.log"]
    return {
        "texts": texts,
        "generated": generated,
        "folders": [f for f in folders if f.is_dir()] + ([partial] if partial.exists() else []),
        "files": [f for f in folders if f.is_file()],
        "root": root,
    }


@pytest.fixture(scope="module")
def tofu_run(tiny_lm, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        yield run_tofu(tmp_path_factory.mktemp("hygiene"), tiny_lm, mp)


def _search(run: dict, texts: set[str]) -> dict[str, list[str]]:
    found = leaks(run["folders"], texts)
    for file in run["files"]:
        if any(t.encode() in file.read_bytes() for t in texts):
            found[str(file)] = [t[:40] for t in texts if t.encode() in file.read_bytes()]
    return found


@pytest.mark.full
def test_no_forget_text_is_left_after_a_tofu_run(tofu_run):
    texts = tofu_run["texts"]
    assert len(texts) >= 60  # 20 forget rows: questions, answers, paraphrases, perturbed answers
    assert (tofu_run["root"] / "out" / "report.json").is_file()
    assert (tofu_run["root"] / "model" / "tofu_eval.json").is_file()  # the evaluation cache was searched
    assert _search(tofu_run, texts) == {}
    # the search can fail: a planted copy of one forget answer is found
    planted = tofu_run["root"] / "tmp" / "planted" / "copy.txt"
    planted.parent.mkdir(exist_ok=True)
    planted.write_text("x" + sorted(texts)[0] + "x")
    try:
        assert list(_search(tofu_run, texts)) == [str(planted)]
    finally:
        shutil.rmtree(planted.parent)


@pytest.mark.full
def test_no_generated_forget_answer_is_written(tofu_run):
    assert len(tofu_run["generated"]) >= 20  # the original's and the final model's forget generations
    assert _search(tofu_run, {CANARY}) == {}


def test_local_image_data_leaves_no_datasets_cache(tiny_cifar, tmp_path, monkeypatch):
    from engine.data.sources import load_splits

    cache, tmp = isolate_caches(monkeypatch, tmp_path)
    splits = load_splits(str(tiny_cifar), ["train", "test"])
    assert len(splits["train"]) == 150 and len(splits["train"][0]["img"].tobytes()) == 32 * 32 * 3
    left = [str(p) for folder in (cache, tmp) for p in folder.rglob("*") if p.is_file()]
    assert left == []
