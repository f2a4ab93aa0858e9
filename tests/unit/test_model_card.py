"""Hugging Face-native outputs: the model card is huggingface_hub's ModelCard (base model, datasets, license, tags,
metrics as model-index results), receipts name the hub commit of what was read, and `output.push_to_hub` uploads
the model with its card and receipt (recorded here: nothing in these tests reaches the hub)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from engine.artifacts.export import model_card
from engine.artifacts.hub import push_run
from engine.cli import main
from engine.errors import OutputError
from engine.models.vision import build_vision_model
from engine.testing import text_overrides, tiny_overrides, write_author_documents

SHA = "0123456789abcdef0123456789abcdef01234567"
FORGET = {
    "kind": "class",
    "description": "every training example of class 0",
    "size": 40,
    "ids_sha256": "ab" * 32,
}


def test_the_card_parses_with_huggingface_hub_and_its_model_index_round_trips(tmp_path):
    """`ModelCard.validate` posts the card to the hub, so the card data is checked field by field instead."""
    metrics = {"forget_error": 12.5, "retain_error": 1.0, "mia": float("nan"), "privleak": None}
    card = model_card("scrub unlearning: class 0", FORGET, {"name": "scrub", "lr": 0.1}, metrics,
                      model_name="you/scrub-cifar", task_type="image-classification",
                      tags=["machine-unlearning", "scrub", "scrub"], base_model="acme/net",
                      datasets=["uoft-cs/cifar10"], eval_dataset="uoft-cs/cifar10", eval_dataset_revision=SHA,
                      license="mit")  # fmt: skip
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data.to_dict()
    assert data["base_model"] == "acme/net" and data["datasets"] == ["uoft-cs/cifar10"]
    assert data["license"] == "mit" and data["library_name"] == "transformers"
    assert data["tags"] == ["machine-unlearning", "scrub"]  # each tag once
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "you/scrub-cifar"
    # only finite numbers become results: a NaN or a missing metric is not a score
    assert {(r.metric_type, r.metric_value) for r in results} == {
        ("forget_error", 12.5),
        ("retain_error", 1.0),
    }
    assert {(r.task_type, r.dataset_type, r.dataset_revision) for r in results} == {
        ("image-classification", "uoft-cs/cifar10", SHA)
    }
    body = loaded.text
    assert "## What was forgotten" in body and "ab" * 32 in body and "| lr | 0.1 |" in body
    assert "| forget_error | 12.5 |" in body


def _fake_hub_model(cache: Path, repo: str, license: str) -> None:
    """A model repository as huggingface_hub caches it (refs/main -> snapshots/<commit>/), with a card."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / SHA
    build_vision_model("preact_resnet18", num_labels=3, width=0.125).save_pretrained(snapshot)
    (snapshot / "README.md").write_text(f"---\nlicense: {license}\n---\n# a tiny net\n")
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(SHA)


def test_a_run_from_a_hub_model_names_its_base_and_receipts_the_commit_it_read(
    tiny_cifar, tmp_path, monkeypatch
):
    """model.path is a hub id (served offline from a hub cache, as a download leaves it) and data.dataset is a hub
    id read from its UNLEARN_DATA_MIRROR copy: the card names both, with the base model's license; the receipt
    has the model's commit and the dataset's mirror (no revision)."""
    _fake_hub_model(tmp_path / "hub", "acme/tiny-net", "mit")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "cifar10").symlink_to(tiny_cifar)
    monkeypatch.setenv("UNLEARN_DATA_MIRROR", str(tmp_path / "mirror"))
    over = tiny_overrides("uoft-cs/cifar10", tmp_path, **{"model.path": "acme/tiny-net", "method.epochs": "1",
                                                           "eval.reference": "null"})  # fmt: skip
    assert main(["run", "configs/demo.yaml", *over]) == 0
    out = tmp_path / "out"
    data = ModelCard.load(out / "model" / "README.md").data.to_dict()
    assert data["base_model"] == "acme/tiny-net" and data["datasets"] == ["uoft-cs/cifar10"]
    assert data["license"] == "mit"  # inherited from the base model's card
    assert data["tags"] == ["machine-unlearning", "scrub"]
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "out-model" and {r.metric_type for r in results} >= {"forget_error", "test_error", "mia"}
    assert {r.task_type for r in results} == {"image-classification"}
    receipt = json.loads((out / "receipt.json").read_text())
    assert receipt["input_model"] == {"source": "acme/tiny-net", "local": False, "revision": SHA,
                                      "weights_sha256": None}  # fmt: skip
    assert receipt["sources"]["models"] == [{"source": "acme/tiny-net", "local": False, "revision": SHA}]
    assert receipt["sources"]["datasets"] == [{"source": "uoft-cs/cifar10", "local": False, "revision": None,
                                               "mirror": str(tmp_path / "mirror" / "cifar10")}]  # fmt: skip


class RecordingHub:
    """HfApi.create_repo / upload_folder replaced: what they were asked, and the files the uploaded folder held
    at the time (it is removed afterwards). ``fail``: upload_folder then raises, as a refused upload does."""

    def __init__(self, monkeypatch, fail: bool):
        self.calls: list[tuple] = []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            files = sorted(
                str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()
            )
            hub.calls.append(
                ("upload_folder", repo_id, files, (Path(folder_path) / "receipt.json").read_text())
            )
            if fail:
                raise RuntimeError(
                    "401 Client Error: Unauthorized\nInvalid credentials in Authorization header"
                )
            return "commit"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


@pytest.fixture
def pushed_lm_run(tiny_lm, tmp_path, monkeypatch, capsys):
    """A causal-LM run from a local folder on local text with output.push_to_hub set, whose upload fails."""
    # the push's pre-check refuses a push with the hub forbidden (the tests run with HF_HUB_OFFLINE=1)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    hub = RecordingHub(monkeypatch, fail=True)
    corpus, holdout = write_author_documents(tmp_path / "docs", range(0, 6), range(6, 8))
    over = text_overrides(tiny_lm, corpus, holdout, tmp_path / "out", **{"method.epochs": "1", "method.msteps": "1",
                          "output.push_to_hub": "you/unlearned-lm", "output.private": "false"})  # fmt: skip
    rc = main(["run", "configs/text.yaml", *over])
    return rc, capsys.readouterr().err, hub, tmp_path / "out", tiny_lm


def test_a_local_run_has_no_base_model_and_a_failed_upload_keeps_the_run(pushed_lm_run):
    rc, err, hub, out, model = pushed_lm_run
    # the upload was asked with the repository, its visibility, and a folder of the model, its card and receipt
    assert hub.calls[0] == ("create_repo", "you/unlearned-lm",
                            {"private": False, "exist_ok": True, "repo_type": "model"})  # fmt: skip
    _, repo, files, receipt = hub.calls[1]
    assert repo == "you/unlearned-lm"
    assert {"model.safetensors", "config.json", "README.md", "receipt.json", "tokenizer.json"} <= set(files)
    assert json.loads(receipt) == json.loads((out / "receipt.json").read_text())
    # the failure is one line that says where the results are and how to upload them by hand; the run is intact
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the run completed and its results are in")
    assert "401 Client Error" in lines[0] and f"hf upload you/unlearned-lm {out / 'model'}" in lines[0]
    assert (out / "model" / "model.safetensors").is_file() and (out / "receipt.json").is_file()
    assert not (out / "model" / "receipt.json").exists()  # the run folder itself is never changed
    assert not out.with_name("out.upload").exists()
    data = ModelCard.load(out / "model" / "README.md").data.to_dict()
    assert "base_model" not in data and "datasets" not in data  # a local folder, local files: no hub ids
    assert data["tags"] == ["machine-unlearning", "scrub"] and data["pipeline_tag"] == "text-generation"
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "you/unlearned-lm"  # the card is named after the repository it is pushed to
    assert {r.metric_type for r in results} >= {"forget_nll", "holdout_nll"}
    assert {r.dataset_name for r in results} == {"corpus.jsonl"}  # local data: named by its file
    receipt = json.loads((out / "receipt.json").read_text())
    assert receipt["sources"]["models"] == [{"source": str(model), "local": True, "revision": None}]
    assert [d["source"] for d in receipt["sources"]["datasets"]] == [
        str(out.parent / "docs" / "corpus.jsonl"),
        str(out.parent / "docs" / "holdout.jsonl"),
    ]


def test_a_successful_push_uploads_model_card_and_receipt(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "README.md"):
        (run / "model" / name).write_text(name)
    (run / "receipt.json").write_text("{}")
    hub = RecordingHub(monkeypatch, fail=False)
    logged = []
    url = push_run(run, "you/model", private=True, log=logged.append)
    assert url == "https://huggingface.co/you/model" and "you/model" in logged[0]
    assert hub.calls[0][2]["private"] is True
    assert hub.calls[1][2] == ["README.md", "config.json", "model.safetensors", "receipt.json"]
    assert not (tmp_path / "run.upload").exists()
    (run / "receipt.json").unlink()  # nothing to upload with: refused, in one line, run folder named
    with pytest.raises(OutputError, match=f"results are in {run}") as err:
        push_run(run, "you/model", private=True)
    assert "\n" not in str(err.value)
