"""W&B logging when asked for: offline mode works with no network and writes a local run."""

from __future__ import annotations

from engine.config import LoggingConfig
from engine.tracking import Tracker


def test_wandb_offline_run_is_written_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    tracker = Tracker(LoggingConfig(wandb=True, wandb_mode="offline"), tmp_path, name="t", config={"a": 1})
    tracker.log({"forget_error": 12.5}, step=1)
    tracker.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_wandb_off_by_default_writes_nothing(tmp_path):
    tracker = Tracker(LoggingConfig(), tmp_path, name="t", config={})
    tracker.log({"x": 1.0})
    tracker.finish()
    assert not (tmp_path / "wandb").exists()
