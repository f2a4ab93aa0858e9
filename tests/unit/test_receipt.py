"""`unlearn verify`: a model folder is recognised by the sha256 of its weight files, and any changed byte,
missing or extra weight file is reported by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.artifacts.receipt import VerifyError, verify, write_receipt
from engine.cli import main


def _model(folder, value: float) -> None:
    folder.mkdir(parents=True)
    save_file({"w": torch.full((3,), value)}, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")  # not a weight file: not hashed


@pytest.fixture
def run(tmp_path):
    stage = tmp_path / "run"
    _model(stage / "model", 1.0)
    _model(stage / "model_rewound", 2.0)
    (stage / "config.yaml").write_text("seed: 0\n")
    _model(tmp_path / "original", 0.0)
    write_receipt(stage, forget={"kind": "ids", "size": 2, "ids_sha256": "ab"}, input_model=str(tmp_path / "original"),
                  revision=None, outputs={"model": "model", "model_rewound": "model_rewound"}, method={"name": "scrub"},
                  metrics={"forget_error": 100.0}, started_at="2026-11-27T00:00:00+00:00")  # fmt: skip
    return stage


def test_verify_names_the_exported_model_a_folder_is(run):
    assert verify(run / "receipt.json", run / "model") == "model"
    assert verify(run, run / "model_rewound") == "model_rewound"


def test_a_changed_byte_or_another_model_is_refused_with_the_file_named(run, tmp_path, capsys):
    with pytest.raises(VerifyError, match="model: differs in model.safetensors"):
        verify(run / "receipt.json", tmp_path / "original")
    data = bytearray((run / "model" / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (run / "model" / "model.safetensors").write_bytes(bytes(data))
    assert main(["verify", str(run / "receipt.json"), str(run / "model")]) == 1
    assert "differs in model.safetensors" in capsys.readouterr().err
    save_file({"w": torch.zeros(1)}, run / "model_rewound" / "extra.safetensors")  # an added weight file
    with pytest.raises(VerifyError, match="extra.safetensors"):
        verify(run, run / "model_rewound")


def test_verify_refuses_a_folder_without_weights_and_a_broken_receipt(run, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VerifyError, match="no weight files"):
        verify(run, tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{")
    assert main(["verify", str(tmp_path / "bad.json"), str(run / "model")]) == 2


SHA = "fedcba9876543210fedcba9876543210fedcba98"


def test_the_receipt_names_the_commit_of_a_hub_model_and_what_else_was_read(run):
    sources = {
        "models": [{"source": "acme/net", "local": False, "revision": SHA}],
        "datasets": [{"source": "uoft-cs/cifar10", "local": False, "revision": None, "mirror": "/m/cifar10"}],
    }
    receipt = write_receipt(run, forget={"kind": "ids", "size": 2, "ids_sha256": "ab"}, input_model="acme/net",
                            revision=None, outputs={"model": "model"}, method={"name": "scrub"}, metrics={},
                            started_at="2026-11-27T00:00:00+00:00", sources=sources)  # fmt: skip
    assert receipt["receipt_version"] == 2 and receipt["sources"] == sources
    assert receipt["input_model"] == {
        "source": "acme/net",
        "local": False,
        "revision": SHA,
        "weights_sha256": None,
    }
    local = json.loads((run / "receipt.json").read_text())
    assert local["input_model"]["revision"] == SHA  # what was written is what was returned


@pytest.fixture
def no_mirror_online(tmp_path, monkeypatch):
    """A hub id with no local copy, the hub allowed (resolve() refuses hub ids under HF_HUB_OFFLINE)."""
    from engine import provenance

    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("UNLEARN_DATA_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(provenance, "hub_reachable", lambda: True)  # the fake hub below answers
    provenance.reset()
    yield
    provenance.reset()


def test_a_hub_dataset_is_read_at_the_commit_the_receipt_records(no_mirror_online, monkeypatch):
    """The commit is resolved once (a fake hub answers) and every split is loaded at it."""
    import datasets
    from huggingface_hub import HfApi, ResolvedRevision

    from engine import provenance
    from engine.data.sources import load_rows

    asked, loads = [], []

    def resolve_revision(api, repo_id, *, revision=None, repo_type=None, **kwargs):
        asked.append((repo_id, revision, repo_type))
        return ResolvedRevision(resolved=SHA, initial=revision, repo_id=repo_id, repo_type=repo_type)

    def load_dataset(path, *args, revision=None, **kwargs):
        loads.append((path, revision))
        return {"train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
                "test": datasets.Dataset.from_dict({"text": ["c"]})}  # fmt: skip

    monkeypatch.setattr(HfApi, "resolve_revision", resolve_revision)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_rows("acme/corpus", "train") == [{"text": "a"}, {"text": "b"}]
    assert load_rows("acme/corpus", "test") == [{"text": "c"}]
    assert asked == [("acme/corpus", None, "dataset")]  # once: both splits come from the same commit
    assert loads == [("acme/corpus", SHA), ("acme/corpus", SHA)]
    assert provenance.loaded()["datasets"] == [{"source": "acme/corpus", "local": False, "revision": SHA}]


def test_mirrored_and_local_data_and_local_models_are_recorded_without_a_revision(no_mirror_online, tmp_path):
    from engine import provenance
    from engine.data.sources import resolve
    from engine.models.loading import resolve_model

    (tmp_path / "mirror" / "tofu").mkdir()
    assert resolve("locuslab/TOFU") == str(tmp_path / "mirror" / "tofu")
    assert resolve(str(tmp_path / "mirror")) == str(tmp_path / "mirror")
    _model(tmp_path / "net", 1.0)
    assert resolve_model(str(tmp_path / "net"), None) is None  # a local folder is read as it is
    assert provenance.loaded() == {
        "models": [{"source": str(tmp_path / "net"), "local": True, "revision": None}],
        "datasets": [{"source": "locuslab/TOFU", "local": False, "revision": None,
                      "mirror": str(tmp_path / "mirror" / "tofu")},
                     {"source": str(tmp_path / "mirror"), "local": True, "revision": None}],
    }  # fmt: skip
