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


def make_tiny_cifar(out: Path) -> Path:
    """3 classes (airplane, automobile, bird): 50 train + 20 test images each, as parquet files named
    like the hub's (train-00000-of-00001.parquet), with the original ClassLabel features."""
    import datasets

    if not CIFAR.exists():
        raise FileNotFoundError(
            f"real CIFAR-10 not found at {CIFAR}: ../shared/data must be beside the checkout"
        )
    out.mkdir(parents=True, exist_ok=True)
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


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A tiny real CIFAR-10 (make_tiny_cifar)."""
    if not CIFAR.exists():
        pytest.fail(f"real CIFAR-10 not found at {CIFAR}: the tests need ../shared/data beside the checkout")
    return make_tiny_cifar(tmp_path_factory.mktemp("tiny_cifar"))


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
    return [f"{k}={v}" for k, v in base.items() if v is not None]  # None: leave the key out


TOFU = ROOT.parent / "shared" / "data" / "tofu"
# the shipped configs name hub ids; the tests read our local copies through the mirror mechanism
if (ROOT.parent / "shared" / "data").is_dir():
    os.environ.setdefault("UNLEARN_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in milliseconds on ``texts``, with bos/eos/pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_llama(vocab_size: int, seed: int = 0, **config):
    """A 2-layer Llama of hidden size 32 built from a config in-process (no hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    settings.update(config)
    return LlamaForCausalLM(LlamaConfig(**settings))


def make_tiny_lm(out: Path) -> Path:
    """A folder holding a tiny Llama + its tokenizer, saved with save_pretrained (loaded back by path)."""
    import json

    texts = []
    for name in ("full", "holdout10", "real_authors_perturbed", "world_facts_perturbed"):
        for line in (TOFU / f"{name}.jsonl").read_text().splitlines()[:400]:
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_llama(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer folder (make_tiny_lm)."""
    if not TOFU.exists():
        pytest.fail(f"TOFU not found at {TOFU}: the tests need ../shared/data beside the checkout")
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def write_author_documents(out: Path, authors: range, holdout: range) -> tuple[Path, Path]:
    """A raw-text corpus built from TOFU: one document per fictitious author (its 20 answers joined), with an
    ``author`` column, in ``out/corpus.jsonl`` (``authors``) and ``out/holdout.jsonl`` (``holdout``: authors the
    model never sees)."""
    import json

    rows = [json.loads(line) for line in (TOFU / "full.jsonl").read_text().splitlines()]

    def write(name: str, which: range) -> Path:
        docs = [{"author": f"author_{a}", "text": " ".join(r["answer"] for r in rows[20 * a : 20 * a + 20])}
                for a in which]  # fmt: skip
        path = out / name
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        return path

    out.mkdir(parents=True, exist_ok=True)
    return write("corpus.jsonl", authors), write("holdout.jsonl", holdout)


def text_overrides(model: Path, corpus: Path, holdout: Path, out: Path, **extra) -> list[str]:
    """configs/text.yaml on a corpus of write_author_documents, in seconds: windows of 64 tokens."""
    base = {
        "data.dataset": str(corpus),
        "holdout.dataset": str(holdout),
        "forget.where": "{author: author_1}",
        "model.base": str(model),  # what `train` fine-tunes (the config's is a hub id)
        "model.path": str(model),
        "output_dir": str(out),
        "data.max_length": "64",
        "train.epochs": "3",
        "train.lr": "0.003",
        "eval.reference": "null",
        "eval.max_new_tokens": "8",
        "method.epochs": "2",
        "method.lr": "0.003",
        "logging.progress": "false",
        "backend.num_threads": "1",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items() if v is not None]


def tofu_overrides(model: Path, tmp: Path, **extra) -> list[str]:
    """A TOFU run in seconds: 10 authors (1 forgotten), short answers, one epoch."""
    base = {
        "task": "causal_lm",
        "data.preset": "tofu",
        "tofu.dataset": str(TOFU),
        "tofu.num_authors": "10",
        "tofu.max_length": "192",
        "tofu.utility_examples": "8",
        "tofu.max_new_tokens": "8",
        "model.base": str(model),  # what `train` fine-tunes (the config's is a hub id)
        "model.path": str(model),
        "output_dir": str(tmp / "out"),
        "train.epochs": "1",
        "train.optimizer": "adamw",
        "train.lr": "0.003",
        "train.batch_size": "16",
        "train.augment": "false",
        "train.lr_decay_epochs": "[]",
        "logging.progress": "false",
        "backend.num_threads": "1",
        "eval.batch_size": "32",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items() if v is not None]  # None: leave the key out


def ray_env() -> dict:
    """Environment of the processes a Ray test starts: Ray kept on loopback, no usage stats, an explicit auth
    mode (the same for a head and its clients), one thread per process, and no launcher or fault variables
    from outside."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # fmt: skip
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    for key in (
        "RAY_ADDRESS",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "UNLEARN_FAULT",
    ):
        env.pop(key, None)
    return env


def ray_submit(dashboard: str, config: str, overrides: list[str]) -> str:
    """`launchers/ray_submit.sh DASHBOARD CONFIG overrides...` from the repository, as a user runs it; asserts it
    succeeded and returns its output. A fresh head answers HTTP before its job agent registers: that answer
    alone is retried."""
    import subprocess
    import sys
    import time

    env = {**ray_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for _ in range(48):
        proc = subprocess.run(["bash", "launchers/ray_submit.sh", dashboard, config, *overrides], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1200)  # fmt: skip
        logs = proc.stdout + proc.stderr
        if "No available agent to submit job" not in logs:
            break
        time.sleep(5)
    assert proc.returncode == 0, logs[-4000:]
    assert "succeeded" in logs and "Ray Train run in" in logs
    return logs


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head():
    """One Ray head node on 127.0.0.1 for the Ray tests that join a cluster, started once per test session (per
    pytest-xdist worker that runs such tests) as a child process with a short temp dir; only this head is
    stopped at the end, by its pid (never `ray stop`, which stops every Ray on the machine). Yields
    ``{"address": GCS address, "dashboard": job API URL}``."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    bin_dir = Path(sys.executable).parent
    env = {**ray_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Unix socket paths must stay under 107 bytes
    gcs, dash = free_port(), free_port()
    # every port of its own: two heads at once (the Ray test files on two pytest-xdist workers) would otherwise
    # both want the dashboard agent's default ports, and the second head's job agent never registers
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "runtime-env-agent-port", "metrics-export-port",
                                                     "ray-client-server-port")]  # fmt: skip
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *ports, "--num-cpus=3", f"--temp-dir={temp}",
         "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    info = {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}"}
    try:
        for _ in range(120):  # the job API answers once the dashboard is up
            try:
                urllib.request.urlopen(f"{info['dashboard']}/api/version", timeout=2)
                break
            except OSError:
                if head.poll() is not None:
                    pytest.fail(f"the Ray head exited with status {head.returncode}")
                time.sleep(1)
        yield info
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


# every single-process TOFU reference the distributed tests compare with: SCRUB, 2 epochs of max+min, a
# learning rate that really moves a tiny model, forget batches of 3 (20 forget rows: the last batch has 2 rows,
# so with 2 ranks x 2 micro-batches some are stand-ins)
DIST_RUN = {"eval.reference": "null", "method.lr": "0.003", "method.forget_batch_size": "3"}


@pytest.fixture(scope="session")
def tofu_reference(tiny_lm, tmp_path_factory):
    """``tofu_reference(**overrides)``: the output folder of the single-process `unlearn run configs/tofu.yaml`
    with DIST_RUN and ``overrides`` (an override of None leaves that key out), run once per session for each distinct set of overrides (the reference
    several distributed tests compare their weights with)."""
    from engine.cli import main

    done: dict[tuple, Path] = {}

    def reference(**overrides) -> Path:
        key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
        if key not in done:
            out = tmp_path_factory.mktemp("reference") / "out"
            # a method switch first: the method.* overrides after it apply to that method
            first = {"method": overrides["method"]} if "method" in overrides else {}
            args = tofu_overrides(tiny_lm, out.parent, output_dir=out, **{**first, **DIST_RUN, **overrides})
            assert main(["run", "configs/tofu.yaml", *args]) == 0
            done[key] = out
        return done[key]

    return reference
