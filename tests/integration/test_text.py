"""Any text data (issue 17): `unlearn train` then `unlearn run` of configs/text.yaml on a raw-text corpus made of
TOFU answers joined per author (one document per author, windows of 64 tokens), a tiny Llama. The Original
memorises the corpus (forget NLL far below the holdout authors'); SCRUB brings the forgotten author's NLL to the
holdout level while the retain NLL holds; 2 DeepSpeed ranks and 2 Ray Train workers end as the single process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import main
from engine.testing import text_overrides, write_author_documents
from tests.integration.test_matrix import check_equal, on_ray, torchrun

KEYS = ("forget_nll", "retain_nll", "holdout_nll", "forget_verbatim_rouge", "mia_loss", "mia_zlib", "mia_min_k",
        "mia_min_k_plus_plus", "privleak")  # fmt: skip
TRAIN = {"train.epochs": "12"}  # long enough to memorise the documents
SCRUB = {"method.lr": "0.001", "method.epochs": "3"}


@pytest.fixture(scope="module")
def text(tiny_lm, tmp_path_factory):
    """The corpus and the trained models: runs/.../original (8 authors) and retrain (author_1 left out)."""
    root = tmp_path_factory.mktemp("text")
    corpus, holdout = write_author_documents(root / "data", range(0, 8), range(100, 104))
    models = root / "models"
    assert (
        main(["train", "configs/text.yaml", *text_overrides(tiny_lm, corpus, holdout, models, **TRAIN)]) == 0
    )

    def args(out: Path, **extra) -> list[str]:
        return text_overrides(models / "original", corpus, holdout, out, **extra)

    return {"root": root, "models": models, "args": args}


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def test_scrub_forgets_a_memorised_author_of_a_raw_text_corpus(text):
    models = text["models"]
    original, retrain = report(models / "original"), report(models / "retrain")
    assert retrain["metrics"]["forget_nll"] > original["metrics"]["forget_nll"]  # Retrain never saw author_1
    out = text["root"] / "scrub"
    args = text["args"](out, **SCRUB, **{"eval.reference": str(models / "retrain")})
    assert main(["run", "configs/text.yaml", *args]) == 0
    r = report(out)
    before, after = r["original"], r["metrics"]
    assert set(KEYS) <= before.keys() and set(KEYS) <= after.keys() and r["suite"] == "text"
    # memorised: the forgotten author's windows far more likely than the holdout authors' (never trained on)
    assert before["forget_nll"] < before["holdout_nll"] - 0.8 and before["mia_min_k"] > 0.9
    # forgotten: at the holdout level, not beyond it; the retained documents hold
    assert abs(after["forget_nll"] - after["holdout_nll"]) < 0.4
    assert after["retain_nll"] < before["retain_nll"] + 0.2
    assert abs(after["mia_min_k"] - 0.5) < 0.15
    assert r["forget"]["kind"] == "where" and r["forget"]["rows"] == 1
    assert "Forget NLL per token" in (out / "report.md").read_text()
    ids = json.loads((out / "shards.json").read_text())["forget"]["1"]["0"]
    assert ids and all(i.startswith("1:") for i in ids)  # author_1 is row 1: its windows 1:0, 1:1, ...


@pytest.mark.full
@pytest.mark.parametrize("backend, stage", [("deepspeed", 2), ("ray", 3)])
def test_text_data_on_two_processes_equals_the_single_process(backend, stage, text, ray_head, tiny_lm):
    """The same SCRUB run (one epoch) on 2 DeepSpeed ranks (torchrun) and on 2 Ray Train workers (windows
    tokenized by the driver into token stores) ends with the single process's weights."""
    one = {**SCRUB, "method.epochs": "1", "method.msteps": "1"}
    single = text["root"] / "single"
    if not single.exists():
        assert main(["run", "configs/text.yaml", *text["args"](single, **one)]) == 0
    out = text["root"] / backend
    args = text["args"](out, **one, **{"backend.zero_stage": str(stage)})
    if backend == "ray":
        proc = on_ray("configs/text.yaml", args, ray_head)
    else:
        proc = torchrun("configs/text.yaml", [*args, "backend.name=deepspeed"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    check_equal(out, single, text["models"] / "original", stage)
