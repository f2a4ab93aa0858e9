"""The DeepSpeed JSON the backend builds from configs/deepspeed/*.json and the run config."""

from __future__ import annotations

import json
import os

import pytest

from engine.backends.deepspeed import build_ds_config, ds_optimizer
from engine.config import BackendConfig
from engine.errors import ConfigError
from engine.methods import ScrubConfig


def cfg(tmp_path, content: dict | None = None, **kw) -> BackendConfig:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content if content is not None else {"zero_optimization": {"stage": 2}}))
    return BackendConfig(name="deepspeed", deepspeed_config=str(path), **kw)


def test_run_config_overrides_the_json_and_sets_the_accumulation_boundary(tmp_path):
    ds = build_ds_config(
        cfg(tmp_path, zero_stage=3, dtype="bf16", gradient_accumulation_steps=4), world_size=2
    )
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 0.0  # SCRUB has no clipping
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_an_optimizer_or_scheduler_in_the_json_is_refused(tmp_path, section):
    with pytest.raises(ConfigError, match="method's settings"):
        build_ds_config(cfg(tmp_path, {section: {"type": "AdamW"}}), world_size=1)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"offload_param": "cpu", "zero_stage": 2}, "needs ZeRO stage 3"),
        ({"offload_optimizer": "cpu", "zero_stage": 0}, "needs ZeRO stage 1, 2 or 3"),
        ({"offload_optimizer": "nvme", "zero_stage": 3}, "nvme_path"),
    ],
)
def test_offload_that_deepspeed_cannot_do_is_refused(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        build_ds_config(cfg(tmp_path, **kw), world_size=1)


def test_offload_sections_are_written(tmp_path):
    ds = build_ds_config(cfg(tmp_path, zero_stage=3, offload_optimizer="cpu", offload_param="cpu"), 1)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_missing_or_broken_json_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_ds_config(BackendConfig(name="deepspeed", deepspeed_config=str(tmp_path / "no.json")), 1)
    (tmp_path / "bad.json").write_text("{stage: 3")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(BackendConfig(name="deepspeed", deepspeed_config=str(tmp_path / "bad.json")), 1)


def test_offload_optimizer_keeps_the_methods_update_rule():
    adam = ds_optimizer(ScrubConfig(optimizer="adam", lr=0.01, weight_decay=0.1))
    assert adam["params"] == {"lr": 0.01, "weight_decay": 0.1, "adam_w_mode": False}  # coupled L2
    assert ds_optimizer(ScrubConfig(optimizer="adamw"))["params"]["adam_w_mode"] is True
    with pytest.raises(ConfigError, match="CPU Adam"):
        ds_optimizer(ScrubConfig(optimizer="sgd"))


def test_shipped_deepspeed_configs_are_valid(tmp_path):
    from pathlib import Path

    shipped = sorted(Path("configs/deepspeed").glob("*.json"))
    assert len(shipped) >= 5
    for path in shipped:
        ds = build_ds_config(BackendConfig(name="deepspeed", deepspeed_config=str(path)), world_size=2)
        assert ds["zero_optimization"]["stage"] in (0, 1, 2, 3)


def test_launcher_environment(monkeypatch):
    from engine.backends.deepspeed import _launcher_env

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID",
                "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"):  # fmt: skip
        # set, then deleted: monkeypatch records the original (often absent) state, so the RANK=1 of 2 that
        # _launcher_env writes below does not outlive this test (a later `request process` would refuse)
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    # one of 4 bare srun tasks: refused, instead of 4 worlds of one writing one output folder
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    with pytest.raises(ConfigError, match="slurm_deepspeed.sbatch"):
        _launcher_env()
    monkeypatch.delenv("SLURM_NTASKS")
    # mpirun: Open MPI's variables, with MASTER_ADDR from the user
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        _launcher_env()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    _launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "0")
    # started plainly: a world of one on loopback
    for key in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    _launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == (
        "0",
        "1",
        "127.0.0.1",
    )
