"""What the tests and the benchmarks share: tiny real data and tiny models built in seconds, the overrides
that make a run take seconds, free ports, the environment of a Ray run, and the fault suite's cases.

The data are read from the folder of hub copies that ``UNLEARN_DATA_MIRROR`` names (``cifar10/``, ``tofu/``;
README, "Data"): tests/conftest.py and the Makefile set it to the data folder beside the checkout when there
is one. Nothing here imports the tests: tests/ and benchmarks/ both import this module.

The fault suite: every fault and bad request of issue 7 as a case that runs the real command line (`python
-m engine.cli run|train ...`; two ranks under torchrun over gloo for the distributed cases) on a tiny Llama
and real TOFU rows, or on a tiny ResNet and a tiny real CIFAR-10 (image-classifier runs, `unlearn train`, bad
requests), injects its fault with ``UNLEARN_FAULT`` (engine/faults.py) or damages files by hand, and checks
what happened: exit status, message, what is left on disk, and, for every run that resumes, that it ends with
exactly the weights of an uninterrupted run of the same backend (torch.equal on every tensor).
tests/integration/test_faults.py runs every case as a test; benchmarks/faults.py writes their table.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.artifacts.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]  # the checkout: the cases run `python -m engine.cli` from it
MIRROR = "UNLEARN_DATA_MIRROR"


def data_folder(name: str) -> Path:
    """``$UNLEARN_DATA_MIRROR/name`` (``cifar10``, ``tofu``); a one-line error when it is not there."""
    root = os.environ.get(MIRROR)
    if not root:
        raise FileNotFoundError(f"{MIRROR} is not set: point it at the folder of data copies "
                                "(cifar10/, tofu/); the Makefile and tests/conftest.py set it when "
                                "shared/data is beside the checkout")  # fmt: skip
    folder = Path(root) / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: {MIRROR}={root} holds no copy of {name}")
    return folder


def make_tiny_cifar(out: Path) -> Path:
    """3 classes (airplane, automobile, bird) of the real CIFAR-10: 50 train + 20 test images each, as parquet
    files named like the hub's (train-00000-of-00001.parquet), with the original ClassLabel features."""
    import datasets

    cifar = data_folder("cifar10")
    out.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", 50), ("test", 20)):
        ds = datasets.load_dataset(
            "parquet", data_files=str(cifar / f"{split}-00000-of-00001.parquet"), split="train"
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


def _overrides(base: dict, extra: dict) -> list[str]:
    """``base`` updated with ``extra`` as key=value overrides (None: leave the key out). A method switch
    (``method``) comes first and the ``method.*`` keys before it (the defaults' SCRUB settings) are left out: the
    CLI applies ``method=`` before every other override, so they would otherwise apply to the new method."""
    base.update(extra)
    items = list(base.items())
    if base.get("method") is not None:
        switch = [k for k, _ in items].index("method")
        items = [("method", base["method"])] + [
            (k, v)
            for i, (k, v) in enumerate(items)
            if k != "method" and not (i < switch and k.startswith("method."))
        ]
    return [f"{k}={v}" for k, v in items if v is not None]


def tiny_overrides(dataset: Path, tmp: Path, **extra) -> list[str]:
    """Overrides that make a run take seconds: 3 classes, a very narrow ResNet, 1-2 epochs."""
    return _overrides({
        "data.dataset": str(dataset), "data.classes": "[0,1,2]", "output_dir": str(tmp / "out"),
        "model.arch": "preact_resnet18", "model.width": "0.125", "train.epochs": "2",
        "train.batch_size": "32", "train.lr_decay_epochs": "[]", "method.epochs": "2", "method.msteps": "1",
        "method.forget_batch_size": "16", "method.retain_batch_size": "16", "logging.progress": "false",
        "backend.num_threads": "1", "eval.batch_size": "128",
    }, extra)  # fmt: skip


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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    tie_word_embeddings=True)  # fmt: skip
    settings.update(config)
    return LlamaForCausalLM(LlamaConfig(**settings))


def make_tiny_lm(out: Path) -> Path:
    """A folder holding a tiny Llama + its tokenizer (trained on TOFU's questions and answers), saved with
    save_pretrained (loaded back by path)."""
    texts = []
    for name in ("full", "holdout10", "real_authors_perturbed", "world_facts_perturbed"):
        for line in (data_folder("tofu") / f"{name}.jsonl").read_text().splitlines()[:400]:
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_llama(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_author_documents(out: Path, authors: range, holdout: range) -> tuple[Path, Path]:
    """A raw-text corpus built from TOFU: one document per fictitious author (its 20 answers joined), with an
    ``author`` column, in ``out/corpus.jsonl`` (``authors``) and ``out/holdout.jsonl`` (``holdout``: authors the
    model never sees)."""
    rows = [json.loads(line) for line in (data_folder("tofu") / "full.jsonl").read_text().splitlines()]

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
    return _overrides({
        "data.dataset": str(corpus), "holdout.dataset": str(holdout), "forget.where": "{author: author_1}",
        "model.base": str(model),  # what `train` fine-tunes (the config's is a hub id)
        "model.path": str(model), "output_dir": str(out), "data.max_length": "64", "train.epochs": "3",
        "train.lr": "0.003", "eval.reference": "null", "eval.max_new_tokens": "8", "method.epochs": "2",
        "method.lr": "0.003", "logging.progress": "false", "backend.num_threads": "1",
    }, extra)  # fmt: skip


def tofu_overrides(model: Path, tmp: Path, **extra) -> list[str]:
    """A TOFU run in seconds: 10 authors (1 forgotten), short answers, one epoch."""
    return _overrides({
        "task": "causal_lm", "data.preset": "tofu", "tofu.dataset": str(data_folder("tofu")),
        "tofu.num_authors": "10", "tofu.max_length": "192", "tofu.utility_examples": "8",
        "tofu.max_new_tokens": "8", "model.base": str(model),  # what `train` fine-tunes (the config's: hub)
        "model.path": str(model), "output_dir": str(tmp / "out"), "train.epochs": "1",
        "train.optimizer": "adamw", "train.lr": "0.003", "train.batch_size": "16", "train.augment": "false",
        "train.lr_decay_epochs": "[]", "logging.progress": "false", "backend.num_threads": "1",
        "eval.batch_size": "32",
    }, extra)  # fmt: skip


def ray_env() -> dict:
    """Environment of the processes a Ray run starts: Ray kept on loopback, no usage stats, an explicit auth
    mode (the same for a head and its clients), one thread per process, and no launcher or fault variables
    from outside."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # fmt: skip
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    for key in ("RAY_ADDRESS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "UNLEARN_FAULT"):  # fmt: skip
        env.pop(key, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the fault suite ----------------------------------------------------------------------------------------

FAULT_EPOCH = 2  # every fault strikes in epoch 2, after epoch 1's checkpoint


@dataclass
class Run:
    code: int
    output: str
    seconds: float
    ended: float = field(default_factory=time.time)

    def tail(self, n: int = 600) -> str:
        return self.output[-n:].replace("\n", " | ")


@dataclass
class Context:
    """Shared by the cases: the tiny model and data, and the uninterrupted reference runs (built once)."""

    root: Path
    quick: bool = True
    lm: Path | None = None  # the tiny Llama folder and tiny CIFAR-10 (the tests pass their session-wide ones)
    cifar: Path | None = None
    _refs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        if self.lm is None:
            self.lm = self.root / "tiny_lm"
            if not (self.lm / "model.safetensors").is_file():
                make_tiny_lm(self.lm)
        if self.cifar is None:
            self.cifar = self.root / "tiny_cifar"
            if not (self.cifar / "test-00000-of-00001.parquet").is_file():
                make_tiny_cifar(self.cifar)

    def settings(self) -> dict:
        size = {"tofu.num_authors": "10", "method.epochs": "2"}
        if not self.quick:
            size = {"tofu.num_authors": "20", "method.epochs": "3"}
        return {"eval.reference": "null", "method.lr": "0.003", "method.forget_batch_size": "3", **size}

    def args(self, out: Path, distributed: bool = False, **extra) -> list[str]:
        ds = {"backend.name": "deepspeed", "backend.zero_stage": "3"} if distributed else {}
        return tofu_overrides(self.lm, out.parent, output_dir=out, **{**self.settings(), **ds, **extra})

    def run(self, args: list[str], fault: str | None = None, nproc: int = 1, timeout: int = 600,
            command: str = "run", config: str = "configs/tofu.yaml") -> Run:  # fmt: skip
        """`unlearn COMMAND CONFIG ARGS` as a user runs it (torchrun with ``nproc`` > 1)."""
        env = clean_env()
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
        if fault:
            env["UNLEARN_FAULT"] = fault
        cmd = [sys.executable, "-m", "engine.cli", command, config, *args]
        port = free_port()
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), *cmd[1:]]  # fmt: skip
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            return Run(p.returncode, p.stdout + p.stderr, time.perf_counter() - t)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() + (exc.stderr or b"").decode()
            return Run(-999, out + f"\n[no exit within {timeout} s]", time.perf_counter() - t)
        finally:  # DeepSpeed's CPU all-reduce buffers of a killed run stay in /dev/shm (hundreds of MB)
            for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
                leftover.unlink(missing_ok=True)

    def reference(self, distributed: bool = False) -> Path:
        """The uninterrupted run every resumed run must equal, bit for bit."""
        key = "zero3" if distributed else "single"
        if key not in self._refs:
            out = self.root / f"reference_{key}" / "out"
            if not (out / "model" / "model.safetensors").is_file():
                shutil.rmtree(out.parent, ignore_errors=True)
                r = self.run(self.args(out, distributed), nproc=2 if distributed else 1)
                if r.code != 0:
                    raise RuntimeError(f"the reference run failed: {r.tail(3000)}")
            self._refs[key] = out
        return self._refs[key]

    def vision_args(self, out: Path, **extra) -> list[str]:
        """An image-classifier SCRUB+R run (configs/demo.yaml, a tiny ResNet on tiny real CIFAR-10) of the
        Original that ``vision_models`` trains once."""
        size = {"method.epochs": "2" if self.quick else "3", "method.rewind": "true"}
        return tiny_overrides(self.cifar, out.parent, output_dir=out, overwrite="false", **{
            "model.path": self.vision_models() / "original", "eval.reference": "null", **size, **extra})  # fmt: skip

    def train(self, out: Path, fault: str | None = None) -> Run:
        """`unlearn train configs/demo.yaml`: Original and Retrain, 2 epochs each, of a tiny ResNet."""
        args = tiny_overrides(self.cifar, out.parent, output_dir=out, **{"train.batch_size": "16"})
        return self.run(args, fault=fault, command="train", config="configs/demo.yaml")

    def vision_models(self) -> Path:
        """An uninterrupted `unlearn train`: the Original the vision runs unlearn, and the reference of the
        interrupted training runs."""
        models = self.root / "vision_models" / "out"
        if not (models / "retrain" / "model.safetensors").is_file():
            shutil.rmtree(models.parent, ignore_errors=True)
            r = self.train(models)
            if r.code != 0:
                raise RuntimeError(f"training the vision models failed: {r.tail(3000)}")
        return models

    def vision_run(self, out: Path, fault: str | None = None) -> Run:
        return self.run(self.vision_args(out), fault=fault, config="configs/demo.yaml")

    def vision_reference(self) -> Path:
        if "vision" not in self._refs:
            out = self.root / "reference_vision" / "out"
            if not (out / "model" / "model.safetensors").is_file():
                shutil.rmtree(out.parent, ignore_errors=True)
                r = self.vision_run(out)
                if r.code != 0:
                    raise RuntimeError(f"the vision reference run failed: {r.tail(3000)}")
            self._refs["vision"] = out
        return self._refs["vision"]

    def killed_after_epoch(self) -> Path:
        """``killed/out``: a run killed right after epoch 2's checkpoint (so the checkpoints of epochs 1
        and 2 are both there), restored from a pristine copy on every call (the run is made once; a
        resumed run must have the same output_dir as the one it resumes)."""
        out = self.root / "killed" / "out"
        partial, pristine = checkpoints(out).parent, self.root / "killed" / "pristine"
        if not pristine.is_dir():
            shutil.rmtree(out.parent, ignore_errors=True)
            r = self.run(self.args(out), fault=f"after_checkpoint:{FAULT_EPOCH}")
            assert r.code != 0 and complete_tags(out) == ["epoch_1", "epoch_2"], r.tail(3000)
            shutil.copytree(partial, pristine)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(pristine, partial)
        return out

    def fresh(self, name: str) -> Path:
        folder = self.root / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder / "out"


def clean_env() -> dict:
    """The environment of a case's command: one torch thread, this checkout importable, no leftover fault."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("UNLEARN_FAULT", None)
    return env


def same_weights(a: Path, b: Path, folder: str | None = None) -> bool:
    """Every exported model of run ``a`` (model, and SCRUB+R's model_rewound; or the one in ``folder``)
    equals ``b``'s, bit for bit."""
    from safetensors.torch import load_file

    for name in (folder,) if folder else ("model", "model_rewound"):
        if not (a / name).is_dir() and not (b / name).is_dir():
            continue
        x, y = load_file(a / name / "model.safetensors"), load_file(b / name / "model.safetensors")
        if x.keys() != y.keys() or not all(x[k].equal(y[k]) for k in x):
            return False
    return True


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def checkpoints(out: Path) -> Path:
    return RunFolder(out).checkpoints


def complete_tags(out: Path) -> list[str]:
    folder = checkpoints(out)
    return sorted(p.parent.name for p in folder.glob("*/manifest.json")) if folder.is_dir() else []


CASES: list[tuple[str, str, Callable[[Context], tuple[bool, str]]]] = []
# Scheduling on 2 cores (the cases stay independent): the one-process cases without DeepSpeed or shared
# folders (image-classifier runs, bad requests) run one after another BESIDE the other one-process cases,
# on the core those leave free; the 2-rank cases then run alone.
SIDE: set[str] = set()
TWO_RANKS: set[str] = set()


def case(name: str, expected: str, side: bool = False, ranks: int = 1):
    def register(fn):
        CASES.append((name, expected, fn))
        if side:
            SIDE.add(name)
        if ranks > 1:
            TWO_RANKS.add(name)
        return fn

    return register


# --- faults -----------------------------------------------------------------------------------------


@case(
    "kill a rank mid-epoch, restart",
    "2 ranks (ZeRO-3): rank 1 SIGKILLed in epoch 2; the run fails fast; the restart resumes after epoch 1 "
    "and ends bit-identical to the uninterrupted run",
    ranks=2,
)
def kill_rank_mid_epoch(ctx: Context) -> tuple[bool, str]:
    ref = ctx.reference(distributed=True)
    out = ctx.fresh("kill_rank")
    marker = out.parent / "killed"
    first = ctx.run(ctx.args(out, True), fault=f"step:{FAULT_EPOCH}:step=1:rank=1:once={marker}", nproc=2)
    waited = first.ended - marker.stat().st_mtime if marker.exists() else float("nan")
    second = ctx.run(ctx.args(out, True), nproc=2)
    ok = first.code != 0 and waited < 60 and second.code == 0 and same_weights(out, ref)
    resumed = report(out)["resume"] if second.code == 0 else None
    return ok, (
        f"killed run exit {first.code}, {waited:.1f} s after the kill; restart exit {second.code}, resumed from "
        f"{resumed and resumed['position']}; weights bit-identical: {second.code == 0 and same_weights(out, ref)}"
    )


@case(
    "kill during a checkpoint write",
    "SIGKILL after epoch 2's files, before its manifest: that folder is not a checkpoint; the restart "
    "resumes from epoch 1 and ends bit-identical",
)
def kill_during_save(ctx: Context) -> tuple[bool, str]:
    ref = ctx.reference()
    out = ctx.fresh("kill_during_save")
    first = ctx.run(ctx.args(out), fault=f"during_save:{FAULT_EPOCH}")
    partial = sorted(p.name for p in checkpoints(out).iterdir())
    tags = complete_tags(out)
    second = ctx.run(ctx.args(out))
    ok = first.code == -9 and tags == ["epoch_1"] and second.code == 0 and same_weights(out, ref)
    return ok, (
        f"killed (exit {first.code}) with checkpoint folders {partial}, complete {tags}; "
        f"restart exit {second.code}, resumed from {report(out)['resume']['position'] if second.code == 0 else '-'}"
        f"; bit-identical: {second.code == 0 and same_weights(out, ref)}"
    )


def _damaged(
    ctx: Context, damage: Callable[[Path], None], needle: str, fallback: str, epoch: int = FAULT_EPOCH
):
    ref = ctx.reference()
    out = ctx.killed_after_epoch()
    for later in range(epoch + 1, FAULT_EPOCH + 1):  # as if killed right after epoch ``epoch``
        shutil.rmtree(checkpoints(out) / f"epoch_{later}")
    damage(checkpoints(out) / f"epoch_{epoch}")
    refused = ctx.run(ctx.args(out))
    second = ctx.run(ctx.args(out, **{"checkpoint.on_invalid": fallback}))
    resume = report(out)["resume"] if second.code == 0 else None
    identical = second.code == 0 and same_weights(out, ref)
    ok = refused.code == 2 and needle in refused.output and second.code == 0
    # weights: epoch 2 runs with a fresh Adam, so the result must differ from the uninterrupted run's
    ok = ok and (identical if fallback == "previous" else resume["mode"] == "weights_only" and not identical)
    line = next((ln for ln in refused.output.splitlines() if ln.startswith("error:")), refused.tail())
    return ok, (
        f"resume refused (exit {refused.code}): {line[:260]}; with checkpoint.on_invalid={fallback}: exit "
        f"{second.code}, report.resume = {json.dumps(resume)[:300]}; bit-identical: {identical}"
    )


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@case(
    "corrupt a checkpoint file",
    "one byte of epoch 2's weights flipped: resuming stops, naming the file; checkpoint.on_invalid=previous "
    "resumes from epoch 1, ends bit-identical, and the report records the skipped checkpoint",
)
def corrupt_weights(ctx: Context) -> tuple[bool, str]:
    return _damaged(ctx, lambda d: _flip_byte(d / "model.safetensors"), "model.safetensors", "previous")


@case(
    "corrupt optimizer state, keep the weights",
    "killed after epoch 1, whose optimizer.pt is damaged: resuming stops and offers checkpoint.on_invalid=weights;"
    " with it epoch 2 runs from epoch 1's weights with a fresh optimizer (so it ends unlike the uninterrupted "
    "run), recorded in the report",
)
def corrupt_optimizer(ctx: Context) -> tuple[bool, str]:
    return _damaged(ctx, lambda d: _flip_byte(d / "optimizer.pt"), "on_invalid=weights", "weights", epoch=1)


@case(
    "truncate a manifest",
    "epoch 2's manifest.json cut in half: resuming stops, naming it; checkpoint.on_invalid=previous resumes "
    "from epoch 1 and ends bit-identical",
)
def truncated_manifest(ctx: Context) -> tuple[bool, str]:
    def cut(d: Path) -> None:
        text = (d / "manifest.json").read_text()
        (d / "manifest.json").write_text(text[: len(text) // 2])

    return _damaged(ctx, cut, "truncated or not valid JSON", "previous")


@case(
    "resume with another world size",
    "a 2-rank ZeRO-2 run killed after epoch 1, started again as 1 process: stops naming the field world_size; "
    "checkpoint.on_invalid=weights continues from its weights with a fresh optimizer (under ZeRO-3 this is "
    "refused: the weights are partitioned with the optimizer state)",
    ranks=2,
)
def other_world_size(ctx: Context) -> tuple[bool, str]:
    out = ctx.fresh("other_world_size")
    zero2 = {"backend.zero_stage": "2"}
    first = ctx.run(ctx.args(out, True, **zero2), fault="after_checkpoint:1", nproc=2)
    refused = ctx.run(ctx.args(out, True, **zero2), nproc=1)
    second = ctx.run(ctx.args(out, True, **zero2, **{"checkpoint.on_invalid": "weights"}), nproc=1)
    resume = report(out)["resume"] if second.code == 0 else None
    line = next((ln for ln in refused.output.splitlines() if ln.startswith("error:")), refused.tail())
    ok = first.code != 0 and refused.code == 2 and "field 'world_size' is 2, this run has 1" in line
    ok = ok and second.code == 0 and resume["mode"] == "weights_only"
    return (
        ok,
        f"refused (exit {refused.code}): {line[:300]}; with on_invalid=weights: exit {second.code}, {resume}",
    )


def token_store_bytes(args: list[str]) -> int:
    """Bytes of the token stores `unlearn run configs/tofu.yaml ARGS` writes into OUTPUT.tokens."""
    import tempfile

    from engine.config import load_config
    from engine.tasks import build_task

    cfg = load_config("configs/tofu.yaml", args, command="run")
    with tempfile.TemporaryDirectory() as tmp:
        build_task(cfg, cfg.model.path).streams(folder=Path(tmp))
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


@case(
    "disk full during a save",
    "the run folder on a tmpfs with room for 1.5 checkpoints: epoch 2's save fails (ENOSPC) with an error "
    "naming the intact epoch-1 checkpoint; after freeing space the same command resumes, bit-identical",
)
def disk_full(ctx: Context) -> tuple[bool, str]:
    ref = ctx.reference()
    probe = ctx.killed_after_epoch()
    size = sum(p.stat().st_size for p in (checkpoints(probe) / "epoch_1").rglob("*") if p.is_file())
    out = ctx.fresh("disk_full")
    mount, saved = out.parent / "mnt", out.parent / "saved"
    mount.mkdir()
    out = mount / "out"
    # the run's token stores (OUTPUT.tokens, beside the run folder on the same tmpfs) take room too: written here
    # the way the run writes them, to measure them
    tokens = token_store_bytes(ctx.args(out))
    limit = int(size * 1.5) + tokens  # room for the stores and epoch 1, not for epoch 2 beside it
    inner = " ".join(["exec", sys.executable, "-m", "engine.cli", "run", "configs/tofu.yaml", *ctx.args(out)])
    script = (
        f"mount -t tmpfs -o size={limit} tmpfs {mount} || exit 97; ( {inner} ); rc=$?; "
        f"mkdir -p {saved} && cp -a {mount}/. {saved}/; exit $rc"
    )
    env = clean_env()
    t = time.perf_counter()
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    seconds = time.perf_counter() - t
    if p.returncode == 97 or not saved.exists():
        return False, f"could not mount a tmpfs here (needs root or user namespaces): {p.stderr[-300:]}"
    for item in saved.iterdir():  # the tmpfs is gone with its namespace: put what it held back in place
        shutil.move(str(item), str(mount / item.name))
    error = next((ln for ln in p.stderr.splitlines() if ln.startswith("error:")), p.stderr[-300:])
    tags = complete_tags(out)
    second = ctx.run(ctx.args(out))
    identical = second.code == 0 and same_weights(out, ref)
    ok = (
        p.returncode == 2
        and ("No space left" in error or "the disk is full" in error)
        and tags == ["epoch_1"]
        and identical
    )
    return ok, (
        f"tmpfs of {limit:,} B (a checkpoint is {size:,} B, the token stores {tokens:,} B): exit {p.returncode} after "
        f"{seconds:.0f} s: "
        f"{error[:300]}; complete checkpoints left: {tags}; restart exit {second.code}; bit-identical: {identical}"
    )


@case(
    "NaN in the loss on one rank",
    "2 ranks: rank 1's loss becomes NaN in epoch 2; rank 0 sees it in that step and both stop before applying it, exit 3; "
    "epoch 1's checkpoint stays complete and verified",
    ranks=2,
)
def nan_one_rank(ctx: Context) -> tuple[bool, str]:
    out = ctx.fresh("nan_one_rank")
    r = ctx.run(ctx.args(out, True), fault=f"step:{FAULT_EPOCH}:step=1:rank=1:do=nan", nproc=2)
    stopped = [ln for ln in r.output.splitlines() if "non-finite" in ln and "error:" in ln]
    tags = complete_tags(out)
    # the NaN was on rank 1: rank 0 reporting it shows the all-reduce carried it in that same step (the
    # launcher may end rank 1 before it prints)
    seen = any("seen by rank 0 of 2" in ln for ln in stopped)
    ok = r.code != 0 and seen and tags == ["epoch_1"] and "exitcode  : 3" in r.output
    return (
        ok,
        f"exit {r.code}; {len(stopped)} rank(s) reported: {stopped[:2]}; complete checkpoints: {tags}",
    )


@case(
    "a rank that hangs",
    "2 ranks, backend.timeout_s=10: rank 1 stops responding in epoch 2; rank 0 fails within the timeout "
    "(not 30 minutes) and the launcher ends the run; epoch 1's checkpoint is kept",
    ranks=2,
)
def hanging_rank(ctx: Context) -> tuple[bool, str]:
    out = ctx.fresh("hanging_rank")
    marker = out.parent / "hung"
    r = ctx.run(ctx.args(out, True, **{"backend.timeout_s": "10"}),
                fault=f"step:{FAULT_EPOCH}:step=1:rank=1:do=hang:once={marker}", nproc=2, timeout=300)  # fmt: skip
    after = r.ended - marker.stat().st_mtime if marker.exists() else float("nan")
    said = next((ln for ln in r.output.splitlines() if "did not answer" in ln), r.tail(300))
    ok = r.code not in (0, -999) and marker.exists() and complete_tags(out) == ["epoch_1"]
    ok = ok and "did not answer" in r.output and after < 10 + 60
    return ok, f"exit {r.code}, {after:.0f} s after the hang began (timeout 10 s): {said[:300]}"


@case(
    "SIGTERM (preemption)",
    "SIGTERM in epoch 2: a checkpoint at the next step boundary, exit 75; the same command resumes from that "
    "step and ends bit-identical",
)
def sigterm(ctx: Context) -> tuple[bool, str]:
    ref = ctx.reference()
    out = ctx.fresh("sigterm")
    first = ctx.run(ctx.args(out), fault=f"step:{FAULT_EPOCH}:step=2:do=term")
    tags = complete_tags(out)
    second = ctx.run(ctx.args(out))
    identical = second.code == 0 and same_weights(out, ref)
    resumed = report(out)["resume"]["position"] if second.code == 0 else None
    ok = first.code == 75 and second.code == 0 and identical and resumed and "step" in resumed
    return (
        ok,
        f"exit {first.code}, checkpoints {tags}; restart exit {second.code} from {resumed}; bit-identical: {identical}",
    )


@case(
    "SIGTERM on one rank of two",
    "2 ranks: only rank 1 gets SIGTERM; both agree in that step's all-reduce, checkpoint together and exit 75; "
    "the restart resumes mid-epoch and ends bit-identical to the uninterrupted 2-rank run",
    ranks=2,
)
def sigterm_one_rank(ctx: Context) -> tuple[bool, str]:
    ref = ctx.reference(distributed=True)
    out = ctx.fresh("sigterm_one_rank")
    first = ctx.run(ctx.args(out, True), fault=f"step:{FAULT_EPOCH}:step=1:rank=1:do=term", nproc=2)
    tags = complete_tags(out)
    second = ctx.run(ctx.args(out, True), nproc=2)
    identical = second.code == 0 and same_weights(out, ref)
    ok = first.code != 0 and "exitcode  : 75" in first.output and any("-" in t for t in tags) and identical
    return (
        ok,
        f"exit {first.code}, checkpoints {tags}; restart exit {second.code}; bit-identical: {identical}",
    )


@case(
    "SIGTERM in an image-classifier run",
    "SCRUB+R on a tiny ResNet (real CIFAR-10): SIGTERM in epoch 2, a checkpoint at the next step, exit 75; the "
    "same command resumes from that step and ends bit-identical (the model and the rewound model)",
    side=True,
)
def vision_sigterm(ctx: Context) -> tuple[bool, str]:
    ref = ctx.vision_reference()
    out = ctx.fresh("vision_sigterm")
    first = ctx.vision_run(out, fault=f"step:{FAULT_EPOCH}:step=2:do=term")
    tags = complete_tags(out)
    second = ctx.vision_run(out)
    identical = second.code == 0 and same_weights(out, ref)
    resumed = report(out)["resume"]["position"] if second.code == 0 else None
    ok = first.code == 75 and identical and resumed is not None and "step" in resumed
    return (
        ok,
        f"exit {first.code}, checkpoints {tags}; restart exit {second.code} from {resumed}; bit-identical: {identical}",
    )


@case(
    "kill an image-classifier run mid-epoch, restart",
    "SCRUB+R on a tiny ResNet: SIGKILL in epoch 2; the same command resumes after epoch 1 (not from the "
    "beginning, and says so) and ends bit-identical",
    side=True,
)
def vision_kill(ctx: Context) -> tuple[bool, str]:
    ref = ctx.vision_reference()
    out = ctx.fresh("vision_kill")
    first = ctx.vision_run(out, fault=f"step:{FAULT_EPOCH}:step=1:do=kill")
    tags = complete_tags(out)
    second = ctx.vision_run(out)
    identical = second.code == 0 and same_weights(out, ref)
    resumed = report(out)["resume"]["position"] if second.code == 0 else None
    said = "resuming from the checkpoint of epoch 1" in second.output
    # SCRUB+R keeps epoch 0 (the original) and every epoch's checkpoint until the run ends: it rewinds to one
    ok = first.code == -9 and tags == ["epoch_0", "epoch_1"] and identical and resumed == "epoch 1" and said
    return (
        ok,
        f"exit {first.code}, checkpoints {tags}; restart exit {second.code} from {resumed}; bit-identical: {identical}",
    )


@case(
    "SIGTERM in `unlearn train`, each target",
    "training the Original then Retrain (tiny ResNet), SIGTERM in epoch 2 of each: each time a checkpoint and "
    "exit 75; the reruns resume the Original mid-epoch, then keep it and resume Retrain; both bit-identical",
    side=True,
)
def train_sigterm(ctx: Context) -> tuple[bool, str]:
    ref = ctx.vision_models()
    out = ctx.fresh("train_sigterm")
    # the same fault each time: a resumed target is past it, so it strikes the next target's epoch 2
    runs = [ctx.train(out, fault=f"step:{FAULT_EPOCH}:step=1:do=term") for _ in range(3)]
    codes = [r.code for r in runs]
    kept = "original: finished before the interruption, kept" in runs[2].output
    resumed = [
        report(out / t)["resume"]["position"] if codes[2] == 0 else None for t in ("original", "retrain")
    ]
    identical = codes[2] == 0 and all(
        same_weights(out / t, ref / t, folder=".") for t in ("original", "retrain")
    )
    ok = codes == [75, 75, 0] and kept and identical and all(resumed)
    return (
        ok,
        f"exits {codes}; resumed from {resumed}; Original kept on the last run: {kept}; bit-identical: {identical}",
    )


# --- bad requests: refused before any work --------------------------------------------------------


def _refused(ctx: Context, name: str, args: list[str], needle: str, command: str = "run",
             config: str = "configs/demo.yaml") -> tuple[bool, str]:  # fmt: skip
    env = clean_env()
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "engine.cli", command, config, *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    seconds = time.perf_counter() - t
    error = next((ln for ln in p.stderr.splitlines() if ln.startswith("error:")), p.stderr[-300:])
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    wrote = out.exists() and name != OUTPUT_TAKEN
    ok = p.returncode == 2 and needle in error and not wrote
    return ok, f"exit {p.returncode} after {seconds:.1f} s, nothing written: {not wrote}: {error[:300]}"


def _vision(ctx: Context, name: str, **extra) -> list[str]:
    tmp = ctx.fresh("bad_" + name.replace(" ", "_")).parent
    return tiny_overrides(ctx.cifar, tmp, **extra)


def _bad(name: str, expected: str, needle: str, **extra):
    @case(name, expected, side=True)
    def check(ctx: Context) -> tuple[bool, str]:
        return _refused(ctx, name, _vision(ctx, name, **extra), needle, command="train")

    return check


_bad("forget ids missing from the data", "exit 2, names how many ids are missing and shows them",
     "not in", **{"forget.kind": "ids", "forget.ids": "[0,1,999999]"})  # fmt: skip
_bad("duplicate forget ids", "exit 2, names the duplicates", "more than once",
     **{"forget.kind": "ids", "forget.ids": "[0,1,1]"})  # fmt: skip
_bad("forget and retain ids overlap", "exit 2, names the overlap", "in both the forget and the retain set",
     **{"forget.kind": "ids", "forget.ids": "[0,1,2]", "forget.retain_ids": "[2,3,4]", "data.val_fraction": "0"})  # fmt: skip
_bad("an empty forget set", "exit 2, says that forget ids are needed", "needs forget.ids",
     **{"forget.kind": "ids", "forget.ids": "[]"})  # fmt: skip


@case("a class-count mismatch", "a 10-class checkpoint on 3-class data: exit 2, names both counts", side=True)
def class_mismatch(ctx: Context) -> tuple[bool, str]:
    from engine.models.vision import build_vision_model

    model = ctx.root / "ten_classes"
    if not (model / "model.safetensors").is_file():
        build_vision_model("preact_resnet18", num_labels=10, width=0.125).save_pretrained(model)
    args = _vision(ctx, "class mismatch", **{"model.path": str(model), "model.arch": "null"})
    return _refused(ctx, "a class-count mismatch", args, "predicts 10 classes but the data has 3")


@case(
    "a tokenizer that does not fit the model",
    "a model with a smaller vocabulary than its tokenizer: exit 2",
    side=True,
)
def vocab_mismatch(ctx: Context) -> tuple[bool, str]:
    from transformers import AutoTokenizer

    model = ctx.root / "small_vocab_lm"
    if not (model / "model.safetensors").is_file():
        build_tiny_llama(vocab_size=64).save_pretrained(model)
        AutoTokenizer.from_pretrained(ctx.lm).save_pretrained(model)
    out = ctx.fresh("bad_vocab")
    args = tofu_overrides(model, out.parent, output_dir=out, **ctx.settings())
    return _refused(ctx, "vocab", args, "embedding has 64 rows", config="configs/tofu.yaml")


OUTPUT_TAKEN = "output folder holding another run's results"


@case(
    OUTPUT_TAKEN,
    "exit 2 unless overwrite=true or a resume; the folder is untouched",
    side=True,
)
def output_taken(ctx: Context) -> tuple[bool, str]:
    args = _vision(ctx, "output taken", overwrite="false")  # configs/demo.yaml overwrites: a demo reruns
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    out.mkdir(parents=True)
    (out / "report.json").write_text('{"another": "run"}')
    ok, observed = _refused(ctx, OUTPUT_TAKEN, args, "already holds results", command="train")
    untouched = (out / "report.json").read_text() == '{"another": "run"}'
    return ok and untouched, f"{observed}; folder untouched: {untouched}"


@case(
    "unsafe model source: pickle weights",
    "a folder with only pytorch_model.bin: exit 2, nothing unpickled",
    side=True,
)
def pickle_only(ctx: Context) -> tuple[bool, str]:
    model = ctx.root / "pickle_lm"
    if not (model / "pytorch_model.bin").is_file():
        import torch
        from transformers import AutoTokenizer

        lm = build_tiny_llama(vocab_size=400)
        lm.config.save_pretrained(model)  # transformers 5 writes safetensors even when asked not to:
        torch.save(lm.state_dict(), model / "pytorch_model.bin")  # the pickle file, written by hand
        AutoTokenizer.from_pretrained(ctx.lm).save_pretrained(model)
    out = ctx.fresh("bad_pickle")
    args = tofu_overrides(model, out.parent, output_dir=out, **ctx.settings())
    return _refused(ctx, "pickle", args, "safetensors", config="configs/tofu.yaml")


@case(
    "unsafe model source: remote code without a revision",
    "trust_remote_code=true unpinned: exit 2",
    side=True,
)
def remote_code(ctx: Context) -> tuple[bool, str]:
    out = ctx.fresh("bad_remote_code")
    args = tofu_overrides(
        ctx.lm, out.parent, output_dir=out, **ctx.settings(), **{"model.trust_remote_code": "true"}
    )
    return _refused(ctx, "remote", args, "model.revision", config="configs/tofu.yaml")


def run_case(ctx: Context, name: str) -> dict:
    expected, fn = next((e, f) for n, e, f in CASES if n == name)
    t = time.perf_counter()
    try:
        passed, observed = fn(ctx)
    except Exception as exc:  # a case that crashes is a failed case, not a crashed suite
        passed, observed = False, f"{type(exc).__name__}: {exc}"
    return {"name": name, "expected": expected, "observed": observed, "passed": bool(passed),
            "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
