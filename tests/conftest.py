"""Shared fixtures: one thread per process (2-core machines), and a tiny real CIFAR-10 in the hub's
layout, cut from ../shared/data/cifar10 so every data test reads real images in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """3 classes (airplane, automobile, bird): 50 train + 20 test images each, as parquet files named
    like the hub's (train-00000-of-00001.parquet), with the original ClassLabel features."""
    import datasets

    if not CIFAR.exists():
        pytest.fail(f"real CIFAR-10 not found at {CIFAR}: the tests need ../shared/data beside the checkout")
    out = tmp_path_factory.mktemp("tiny_cifar")
    for split, per_class in (("train", 50), ("test", 20)):
        ds = datasets.load_dataset(
            "parquet", data_files=str(CIFAR / f"{split}-00000-of-00001.parquet"), split="train"
        )
        labels = ds["label"]
        keep, counts = [], {0: 0, 1: 0, 2: 0}
        for i, y in enumerate(labels):
            if y in counts and counts[y] < per_class:
                keep.append(i)
                counts[y] += 1
            if all(c == per_class for c in counts.values()):
                break
        ds.select(keep).to_parquet(str(out / f"{split}-00000-of-00001.parquet"))
    return out


def tiny_overrides(dataset: Path, tmp: Path, **extra) -> list[str]:
    """Overrides that make a run take seconds: 3 classes, a very narrow ResNet, 1-2 epochs."""
    base = {
        "data.dataset": str(dataset),
        "data.classes": "[0,1,2]",
        "output_dir": str(tmp / "out"),
        "model.arch": "preact_resnet18",
        "model.width": "0.125",
        "train.epochs": "2",
        "train.batch_size": "32",
        "train.lr_decay_epochs": "[]",
        "method.epochs": "2",
        "method.msteps": "1",
        "method.forget_batch_size": "16",
        "method.retain_batch_size": "16",
        "logging.progress": "false",
        "backend.num_threads": "1",
        "eval.batch_size": "128",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
