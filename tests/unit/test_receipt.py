"""`unlearn verify`: a model folder is recognised by the sha256 of its weight files, and any changed byte,
missing or extra weight file is reported by name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint.receipt import VerifyError, verify, write_receipt
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
