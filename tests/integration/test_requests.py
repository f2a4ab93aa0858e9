"""`unlearn request process` on tiny real CIFAR-10: two requests processed in turn; a SIGKILL during the second
job, after it, or while it is published leaves the second request not done and no v2 recorded, and running the
command again finishes it with the weights of the uninterrupted stream; the second job never trains on an id the
first forgot; every 2nd version retrained when ledger.retrain_every=2, a version past ledger.retrain_bound retrained
instead; a failed batch released and served; the stream processed on two DeepSpeed ranks and as a Ray Train job
on two workers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main
from engine.config import load_config
from engine.requests.ledger import Ledger
from engine.testing import REPO, clean_env, free_port, ray_env, same_weights, tiny_overrides

CONFIG = "configs/demo.yaml"


class Stream:
    def __init__(self, root: Path, cifar: Path):
        self.root, self.cifar = root, cifar
        self.models = root / "models"
        assert main(["train", CONFIG, *tiny_overrides(cifar, root, output_dir=self.models,
                                                     **{"train.batch_size": "16"}), "--only", "original"]) == 0  # fmt: skip
        from engine.data.vision import prepare_data

        cfg = load_config(
            CONFIG, self.args(root / "probe", **{"forget.kind": "random", "forget.fraction": "0.1"})[1:]
        )
        data = prepare_data(cfg.data, cfg.forget)
        train = sorted(data.forget.ids + data.retain.ids)
        self.batches = [train[:12], train[12:24], train[::7][:12]]  # the third across classes
        for k, ids in enumerate(self.batches):
            (root / f"ids{k}.txt").write_text("\n".join(map(str, ids)))

    def args(self, out: Path, **extra) -> list[str]:
        return [CONFIG, *tiny_overrides(self.cifar, out.parent, output_dir=out, **{
            "model.path": self.models / "original", "eval.reference": "null", **extra})]  # fmt: skip

    def add(self, out: Path, k: int, **extra) -> None:
        assert (
            main(["request", "add", *self.args(out, **extra), "--ids", str(self.root / f"ids{k}.txt")]) == 0
        )

    def process(
        self, out: Path, fault: str | None = None, env: dict | None = None, **extra
    ) -> subprocess.CompletedProcess:
        env = env or clean_env()
        if fault:
            env["UNLEARN_FAULT"] = fault
        cmd = [sys.executable, "-m", "engine.cli", "request", "process", *self.args(out, **extra)]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def states(out: Path) -> tuple[list[str], list[str]]:
    ledger = Ledger(out / "ledger.sqlite")
    try:
        return [r["state"] for r in ledger.requests()], [v["name"] for v in ledger.versions()]
    finally:
        ledger.close()


@pytest.fixture(scope="module")
def stream(tmp_path_factory, tiny_cifar) -> Stream:
    return Stream(tmp_path_factory.mktemp("requests"), tiny_cifar)


@pytest.fixture(scope="module")
def reference(stream) -> Path:
    """The uninterrupted stream: request 1 -> v1, request 2 -> v2; ``after_v1``: its state before request 2 is
    processed (the starting point of every interrupted run)."""
    out = stream.root / "reference" / "out"
    stream.add(out, 0)
    assert stream.process(out).returncode == 0
    stream.add(out, 1)
    shutil.copytree(out.parent, stream.root / "after_v1")
    p = stream.process(out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.mark.full
def test_two_requests_in_turn(stream, reference, capsys):
    assert states(reference) == (["done", "done"], ["v1", "v2"])
    assert main(["verify", "--chain", str(reference)]) == 0
    chain = [json.loads((reference / v / "receipt.json").read_text())["chain"] for v in ("v1", "v2")]
    assert chain[0]["previous_receipt_sha256"] is None and chain[1]["parent"] == "v1"
    assert chain[1]["previous_receipt_sha256"] is not None
    # v2 unlearned v1's model, forgot the second batch, and never trained on an id the first batch forgot
    shards = json.loads((reference / "v2" / "shards.json").read_text())
    retained = {i for epoch in shards["retain"].values() for ids in epoch.values() for i in ids}
    forgotten = {i for epoch in shards["forget"].values() for ids in epoch.values() for i in ids}
    assert retained and not retained & set(stream.batches[0])
    assert forgotten == set(stream.batches[1]) and not retained & forgotten
    v2_config = (reference / "v2" / "config.yaml").read_text()
    assert str(reference / "v1" / "model") in v2_config
    assert not (reference / ".jobs").exists() or not any((reference / ".jobs").iterdir())
    assert main(["request", "list", *stream.args(reference)]) == 0
    listing = capsys.readouterr().out
    assert "v2    from v1" in listing and "unlearn" in listing


@pytest.mark.full
@pytest.mark.parametrize(
    "stage, fault",
    [("during the job", "after_checkpoint:1"), ("after the job", "request_after_job:2"),
     ("during publishing", "request_during_publish:2")],
)  # fmt: skip
def test_kill_then_rerun_completes(stream, reference, stage, fault):
    out = stream.root / stage.replace(" ", "_") / "out"
    shutil.copytree(stream.root / "after_v1", out.parent)
    killed = stream.process(out, fault)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert states(out) == (["done", "running"], ["v1"])  # request 2 not done, no v2 recorded
    if stage != "during publishing":
        assert not (out / "v2").exists()
    else:  # the folder is in place but not recorded: the chain does not accept it
        assert main(["verify", "--chain", str(out)]) == 1
    rerun = stream.process(out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert states(out) == (["done", "done"], ["v1", "v2"])
    assert same_weights(out / "v2", reference / "v2", folder="model")
    assert main(["verify", "--chain", str(out)]) == 0
    if stage == "during the job":
        assert json.loads((out / "v2" / "report.json").read_text())["resumed_from_epoch"] == 1


@pytest.mark.full
def test_retrain_every(stream):
    out = stream.root / "retrain" / "out"
    extra = {"ledger.retrain_every": "2"}
    for k in (0, 1):
        stream.add(out, k, **extra)
        p = stream.process(out, **extra)
        assert p.returncode == 0, p.stderr[-3000:]
    ledger = Ledger(out / "ledger.sqlite")
    assert [v["made_by"] for v in ledger.versions()] == ["unlearn", "retrain"]
    ledger.close()
    assert json.loads((out / "v2" / "receipt.json").read_text())["chain"]["made_by"] == "retrain"
    assert json.loads((out / "v2" / "report.json").read_text())["method"]["name"] == "retrain"
    assert main(["verify", "--chain", str(out)]) == 0


def policy_of(out: Path, version: str = "v1") -> dict:
    return json.loads((out / version / "receipt.json").read_text())["chain"]["policy"]


@pytest.mark.full
def test_retrain_bound(stream):
    """Within the bound the unlearned candidate is published (its drift recorded); a bound below that drift
    serves the same batch by retraining, discards the candidate, and the ledger records it."""
    loose, tight = stream.root / "bound_loose" / "out", stream.root / "bound_tight" / "out"
    stream.add(loose, 2)  # (the first batches are one class this tiny model never predicts: no drift at all)
    p = stream.process(loose, **{"ledger.retrain_bound": "100"})
    assert p.returncode == 0, p.stderr[-3000:]
    policy = policy_of(loose)
    drift = policy["candidate"]
    metrics = json.loads((loose / "v1" / "report.json").read_text())["metrics"]
    assert policy["reason"] is None and drift["forgotten_error"] == metrics["forgotten_error"]
    assert drift["drift"] == pytest.approx(abs(metrics["forgotten_error"] - metrics["forgotten_val_error"]))
    assert drift["drift"] > 0  # on these 12 examples the unlearned model is not where unseen data is
    stream.add(tight, 2)
    p = stream.process(tight, **{"ledger.retrain_bound": str(drift["drift"] / 2)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "retraining instead" in p.stdout + p.stderr
    policy = policy_of(tight)
    assert (
        policy["reason"] == "retrain_bound" and policy["candidate"] == drift
    )  # the same candidate, discarded
    assert json.loads((tight / "v1" / "report.json").read_text())["method"]["name"] == "retrain"
    assert states(tight) == (["done"], ["v1"])
    ledger = Ledger(tight / "ledger.sqlite")
    assert [v["made_by"] for v in ledger.versions()] == ["retrain"]
    ledger.close()
    assert not any((tight / ".jobs").iterdir())
    assert main(["verify", "--chain", str(tight)]) == 0


@pytest.mark.full
def test_failed_job_released_then_served(stream):
    """A job that fails with an ordinary error leaves its requests running; `release` puts them back and the
    next `process` (the config mended) serves them together with one that arrived meanwhile."""
    out = stream.root / "release" / "out"
    stream.add(out, 0)
    failed = stream.process(out, **{"model.path": str(stream.root / "no_such_model")})
    assert failed.returncode != 0 and "no_such_model" in failed.stderr
    assert states(out) == (["running"], [])
    stream.add(out, 1)
    assert main(["request", "release", *stream.args(out)]) == 0
    assert states(out) == (["pending", "pending"], [])
    p = stream.process(out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert states(out) == (["done", "done"], ["v1"])
    assert json.loads((out / "v1" / "report.json").read_text())["forget"]["size"] == 24


@pytest.mark.full
def test_process_on_two_deepspeed_ranks(stream):
    """`unlearn request process` under torchrun: the main rank claims, both ranks run the job, one version is
    published and recorded; a second call with nothing pending ends on both ranks."""
    out = stream.root / "two_ranks" / "out"
    stream.add(out, 0)
    ds = {"backend.name": "deepspeed", "backend.zero_stage": "2", "backend.timeout_s": "120"}
    env = clean_env()
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    for _ in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "engine.cli", "request", "process", *stream.args(out, **ds)]  # fmt: skip
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "no pending requests" in p.stdout
    assert states(out) == (["done"], ["v1"])
    report = json.loads((out / "v1" / "report.json").read_text())
    assert report["backend"]["world_size"] == 2 and report["forget"]["size"] == 12
    assert main(["verify", "--chain", str(out)]) == 0


@pytest.mark.full
def test_process_as_a_ray_train_job(stream, ray_head):
    """`unlearn request process` with backend.name=ray, joined to a head on loopback: the version's job runs on two
    Ray Train workers, then is published and recorded by the driver, and its chain verifies."""
    out = stream.root / "ray" / "out"
    stream.add(out, 0)
    ray = {"backend.name": "ray", "backend.num_workers": "2", "backend.ray_address": ray_head["address"],
           "backend.timeout_s": "120"}  # fmt: skip
    p = stream.process(out, env={**ray_env(), "PYTHONPATH": str(REPO)}, **ray)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert states(out) == (["done"], ["v1"])
    report = json.loads((out / "v1" / "report.json").read_text())
    assert report["backend"]["world_size"] == 2 and report["forget"]["size"] == 12
    assert main(["verify", "--chain", str(out)]) == 0
