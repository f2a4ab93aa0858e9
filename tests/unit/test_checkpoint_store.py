"""engine/checkpoint/store.py on a tiny model in one process: what a manifest records, and what
resuming does with a damaged file, a truncated manifest, a save that died, and another layout."""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine.backends.single import SingleProcessBackend
from engine.checkpoint.store import MANIFEST, CheckpointStore, rng_state, set_rng_state
from engine.errors import CheckpointError

IDENTITY = {"backend": "single", "world_size": 1, "zero_stage": None, "model_signature": "abc"}


def position(epoch: int, step: int = 0) -> dict:
    return {
        "epoch": epoch,
        "phase": "min" if step else None,
        "phase_index": 0,
        "step": step,
        "epoch_losses": {},
    }


def trained(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    backend = SingleProcessBackend(device="cpu")
    model, _ = backend.prepare(model, None, lambda p: torch.optim.Adam(p, lr=0.1))
    return model, backend


def step(model, backend) -> None:
    model(torch.randn(8, 4)).pow(2).mean().backward()
    backend.step()


@pytest.fixture
def saved(tmp_path):
    """Checkpoints after steps 1 and 2; returns (folder, weights at step 2, weights at step 1)."""
    model, backend = trained()
    store = CheckpointStore(tmp_path / "ck", backend, IDENTITY)
    step(model, backend)
    store.save("epoch_1", position(2), model, {"n": 1})
    first = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, backend)
    store.save("epoch_2", position(3), model, {"n": 2})
    return tmp_path / "ck", {k: v.clone() for k, v in model.state_dict().items()}, first


def load(folder, identity=IDENTITY, on_invalid="error"):
    model, backend = trained(seed=1)  # other weights: loading must replace them
    result = CheckpointStore(folder, backend, identity).load(model, on_invalid)
    return model, backend, result


def same(model, weights) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_the_manifest_lists_every_file_with_its_checksum_and_the_run_layout(saved):
    folder, _, _ = saved
    manifest = json.loads((folder / "epoch_2" / MANIFEST).read_text())
    assert manifest["position"]["epoch"] == 3 and manifest["world_size"] == 1
    assert set(manifest["files"]) == {
        "model.safetensors",
        "optimizer.pt",
        "client_state.json",
        "rng/rank_0.json",
    }
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_1", "epoch_2", "latest"]


def test_resume_restores_weights_optimizer_and_client_state(saved):
    folder, last, _ = saved
    model, backend, result = load(folder)
    assert result["tag"] == "epoch_2" and result["mode"] == "full" and result["client_state"] == {"n": 2}
    assert same(model, last)
    assert backend.optimizer.state_dict()["state"][0]["step"] == 2  # Adam's step count came back


def test_only_the_newest_two_complete_checkpoints_are_kept(saved):
    folder, _, _ = saved
    model, backend, _ = load(folder)
    CheckpointStore(folder, backend, IDENTITY).save("epoch_3", position(4), model, {"n": 3})
    assert sorted(p.name for p in folder.glob("epoch_*")) == ["epoch_2", "epoch_3"]


def test_a_damaged_file_is_named_and_previous_falls_back(saved):
    folder, _, first = saved
    path = folder / "epoch_2" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="epoch_2/model.safetensors does not match its sha256"):
        load(folder)
    with pytest.raises(
        CheckpointError, match="on_invalid=previous"
    ):  # weights are damaged: no weights option
        load(folder, on_invalid="weights")
    model, _, result = load(folder, on_invalid="previous")
    assert result["tag"] == "epoch_1" and result["skipped"][0]["tag"] == "epoch_2" and same(model, first)


def test_another_world_size_is_named_and_weights_keeps_them_with_a_fresh_optimizer(saved):
    folder, last, _ = saved
    other = {**IDENTITY, "world_size": 4}
    with pytest.raises(CheckpointError, match="field 'world_size' is 1, this run has 4"):
        load(folder, other)
    model, backend, result = load(folder, other, on_invalid="weights")
    assert result["mode"] == "weights_only" and same(model, last)
    assert backend.optimizer.state_dict()["state"] == {}  # fresh


def test_another_model_is_never_loaded(saved):
    folder, _, _ = saved
    with pytest.raises(CheckpointError, match="model_signature"):
        load(folder, {**IDENTITY, "model_signature": "other"}, on_invalid="weights")


def test_a_truncated_manifest_is_named_and_a_folder_without_one_is_not_a_checkpoint(saved):
    folder, _, first = saved
    text = (folder / "epoch_2" / MANIFEST).read_text()
    (folder / "epoch_2" / MANIFEST).write_text(text[:40])
    with pytest.raises(CheckpointError, match="truncated or not valid JSON"):
        load(folder)
    (folder / "epoch_2" / MANIFEST).unlink()  # a save that died before its manifest
    model, _, result = load(folder)
    assert result["tag"] == "epoch_1" and same(model, first)


def test_rng_states_round_trip():
    state = rng_state()
    a = (torch.rand(3), random.random())
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a[0]) and random.random() == a[1]


def test_a_restart_that_finds_no_checkpoint_is_refused_not_started_over(tmp_path):
    """A launcher's restart after a failure (Ray Train) expects a checkpoint; without one the run stops with an
    error instead of silently starting from the beginning. A plain first run finds none and starts."""
    from engine.checkpoint.resume import check_resumable
    from engine.errors import OutputError

    partial = tmp_path / "out.partial"
    assert check_resumable(partial, cfg=None) is False
    with pytest.raises(OutputError, match=r"out.partial/checkpoints has no complete checkpoint"):
        check_resumable(partial, cfg=None, expected=True)
