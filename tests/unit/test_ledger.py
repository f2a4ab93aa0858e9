"""Deletion requests as a stream: the SQLite ledger's transactions (add, claim, publish, the union of what is
forgotten), the retain set that never holds an id forgotten earlier, and the chain of receipts that `unlearn verify
--chain` walks (one flipped byte fails it at that link)."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from safetensors.torch import save_file

from engine.artifacts.receipt import VerifyError, sha256_file, write_receipt
from engine.cli import main
from engine.config import load_config
from engine.data.selection import ids_sha256
from engine.errors import ConfigError, DataError
from engine.recipes.request import job_config
from engine.requests.chain import chain_section, verify_chain
from engine.requests.ledger import Ledger, LedgerError
from engine.testing import text_overrides, tiny_overrides, tofu_overrides, write_author_documents
from tests.conftest import TOFU


def test_add_claim_publish(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.claim() is None  # nothing pending
    a, b = ledger.add([3, 1, 2], "first"), ledger.add(["x", 4])
    assert [r["state"] for r in ledger.requests()] == ["pending", "pending"]
    assert (
        ledger.requests()[0]["ids_hash"] == ids_sha256([1, 2, 3]) and ledger.requests()[0]["note"] == "first"
    )
    name, batch = ledger.claim()
    assert name == "v1" and [r["id"] for r in batch] == [a, b]
    c = ledger.add([5])  # arrives while v1 runs: not part of its batch
    assert ledger.claim()[0] == "v1"  # a run that did not finish is claimed again, with the same batch
    assert [r["id"] for r in ledger.claim()[1]] == [a, b]
    assert ledger.forgotten_ids() == []
    ledger.publish("v1", parent="original", made_by="unlearn", forget_hash_batch="h", forget_hash_cumulative="h",
                   receipt_sha256="r", folder="f")  # fmt: skip
    assert {r["id"]: r["state"] for r in ledger.requests()} == {a: "done", b: "done", c: "pending"}
    assert ledger.forgotten_ids() == [3, 1, 2, "x", 4]
    name, batch = ledger.claim()
    assert name == "v2" and [r["id"] for r in batch] == [c]
    ledger.close()
    # the file is a real SQLite database another client reads
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        assert db.execute("SELECT name, made_by FROM versions").fetchall() == [("v1", "unlearn")]


def test_publish_is_one_transaction(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.add([1, 2])
    ledger.claim()
    ledger.publish("v1", parent="original", made_by="unlearn", forget_hash_batch="h", forget_hash_cumulative="h",
                   receipt_sha256="r", folder="f")  # fmt: skip
    ledger.add([3])
    ledger.claim()
    with pytest.raises(sqlite3.IntegrityError):  # v1 again: the insert fails, so the requests stay running
        ledger.publish("v1", parent="original", made_by="unlearn", forget_hash_batch="h",
                       forget_hash_cumulative="h", receipt_sha256="r", folder="f")  # fmt: skip
    assert [r["state"] for r in ledger.requests()] == ["done", "running"]
    assert len(ledger.versions()) == 1
    with pytest.raises(LedgerError, match="more than once"):
        ledger.add([7, 7])
    with pytest.raises(LedgerError, match="at least one id"):
        ledger.add([])


def test_not_a_ledger(tmp_path):
    bad = tmp_path / "ledger.sqlite"
    bad.write_text("not a database" * 100)
    with pytest.raises(LedgerError, match="not a readable ledger"):
        Ledger(bad).requests()


def test_request_add_and_list_commands(tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("5\n7\n9\n")
    args = ["configs/demo.yaml", f"output_dir={tmp_path / 'stream'}"]
    assert main(["request", "add", *args, "--ids", str(ids), "--note", "ticket 12"]) == 0
    assert main(["request", "list", *args]) == 0
    out = capsys.readouterr().out
    assert "pending" in out and "ticket 12" in out and "3 ids" in out
    assert (tmp_path / "stream" / "ledger.sqlite").is_file()  # beside the versions by default
    other = tmp_path / "elsewhere" / "l.sqlite"
    assert main(["request", "add", *args, f"ledger.path={other}", "--ids", str(ids)]) == 0
    assert other.is_file()
    assert main(["request", "add", *args]) == 2  # no --ids: one line
    assert "needs --ids" in capsys.readouterr().err


def test_earlier_ids_is_for_kind_ids_on_both_tasks():
    with pytest.raises(ConfigError, match="earlier_ids needs forget.kind=ids"):
        load_config("configs/demo.yaml", ["forget.earlier_ids=[1]"])
    with pytest.raises(ConfigError, match="earlier_ids needs forget.kind=ids"):  # text.yaml forgets by where
        load_config("configs/text.yaml", ["forget.earlier_ids=[1]"])
    # task=causal_lm serves it: TOFU and any text data
    tofu = load_config("configs/tofu.yaml", ["forget.kind=ids", "forget.ids=[1]", "forget.earlier_ids=[2]"])
    assert tofu.task == "causal_lm" and tofu.data.preset == "tofu" and tofu.forget.earlier_ids == [2]
    text = load_config(
        "configs/text.yaml", ["forget.kind=ids", "forget.ids=[1]", "forget.earlier_ids=[0, a]"]
    )
    assert text.task == "causal_lm" and text.data.preset is None and text.forget.earlier_ids == [0, "a"]
    # no method=retrain for causal LMs: ledger.retrain_every is refused with the config, not at version N
    with pytest.raises(ConfigError, match="retrain_every makes a version with method=retrain"):
        load_config("configs/tofu.yaml", ["ledger.retrain_every=2"])


def test_forgotten_ids_never_in_a_later_retain_set(tiny_cifar, tmp_path):
    """The job of version 2: forget = its batch, retain = training data minus every id ever forgotten."""
    from engine.data.vision import prepare_data

    cfg = load_config("configs/demo.yaml", tiny_overrides(tiny_cifar, tmp_path, **{"model.path": "m"}))
    everything = prepare_data(cfg.data, cfg.model_copy(update={"forget": cfg.forget.model_copy(
        update={"kind": "random", "fraction": 0.1})}).forget)  # fmt: skip
    train = sorted(everything.forget.ids + everything.retain.ids)
    earlier, batch = train[:12], train[12:24]
    job = job_config(cfg, tmp_path / "v2", "m", batch, earlier, retrain=False)
    data = prepare_data(job.data, job.forget)
    assert sorted(data.forget.ids) == batch
    assert not set(data.retain.ids) & set(earlier)
    assert sorted(data.retain.ids) == train[24:]
    retrain = job_config(cfg, tmp_path / "v2", "m", batch, earlier, retrain=True)
    assert retrain.method.name == "retrain" and retrain.method.epochs == cfg.train.epochs
    assert sorted(prepare_data(retrain.data, retrain.forget).retain.ids) == train[24:]
    with pytest.raises(Exception, match="not in the training data"):  # an id forgotten before cannot be again
        prepare_data(*(lambda j: (j.data, j.forget))(job_config(cfg, tmp_path / "v3", "m", earlier[:1], earlier,
                                                                 retrain=False)))  # fmt: skip


def test_forgotten_tofu_rows_never_in_a_later_retain_set(tiny_lm, tmp_path):
    """TOFU (the mirror's copy), 10 authors: the job of version 2 forgets its batch, and the rows earlier versions
    forgot are in no set it trains on (retain rows, their token stores, the Ray driver's rows) nor in the retain
    rows that model utility is scored on; an earlier id naming no kept row (5000) is ignored, as for images."""
    from engine.data.tofu import load_tofu_split, prepare_tofu
    from engine.tasks.causal_lm import CausalLM

    cfg = load_config(
        "configs/tofu.yaml", tofu_overrides(tiny_lm, tmp_path, **{"tofu.utility_examples": None})
    )
    # forget10 of 10 authors: the first 9 authors and TOFU's last one are the training data (ids: rows of full)
    training = set(range(9 * 20)) | set(range(3600, 3620))
    earlier, batch = [0, 1, 2, 30, 3601, 5000], [3, 25, 3605]
    job = job_config(cfg, tmp_path / "v2", str(tiny_lm), batch, earlier, retrain=False)
    data = prepare_tofu(job.tofu, job.forget)
    assert [r["id"] for r in data.forget] == batch
    retain = [r["id"] for r in data.retain]
    assert not set(retain) & set(earlier)
    assert sorted(retain) == sorted(training - set(batch) - set(earlier)) and len(retain) == 200 - 3 - 5
    assert [r["id"] for r in data.full] == retain + batch  # what a job could ever train on
    # the evaluation splits: forget metrics over the batch; model utility over the first 40 retain rows it keeps
    assert [r["id"] for r in data.forget_eval] == batch
    question_id = {r["question"]: i for i, r in enumerate(load_tofu_split(job.tofu.dataset, "full"))}
    assert [question_id[r["question"]] for r in data.retain_eval] == [i for i in range(40) if i not in
                                                                        {0, 1, 2, 3, 25, 30}]  # fmt: skip
    # every place the retain stream comes from: the task's rows, its token stores, the Ray driver's rows
    task = CausalLM(job, job.model.path)
    stores = task.streams(folder=tmp_path / "tokens")
    assert task.row_ids("retain") == retain and len(stores["retain"]) == len(retain)
    assert stores["retain"].example(len(retain) - 1) == task.formatter.encode_row(data.retain[-1])
    assert [r["id"] for r in CausalLM.token_rows(job)[1]["retain"]] == retain
    # a batch id an earlier version forgot already: one line
    with pytest.raises(
        DataError, match=r"^1 forget ids were forgotten by an earlier version .*e\.g\. \[2\]"
    ) as err:
        prepare_tofu(job.tofu, job_config(cfg, tmp_path / "v3", "m", [2, 4], earlier, retrain=False).forget)
    assert "\n" not in str(err.value)


def test_forgotten_text_rows_never_in_a_later_retain_set(tiny_lm, tmp_path):
    """Any text data, ids matched as forget.ids are: the data.id_column value (documents of TOFU's authors, cut into
    windows), or the row index (prompt/answer pairs of TOFU's rows; "38" names row 38, as a forget id would)."""
    from engine.tasks.causal_lm import CausalLM

    corpus, holdout = write_author_documents(tmp_path / "docs", range(6), range(6, 7))
    over = text_overrides(tiny_lm, corpus, holdout, tmp_path / "out", **{"data.id_column": "author"})
    cfg = load_config("configs/text.yaml", over)
    earlier = ["author_0", "author_4", "author_9"]  # author_9: no such row, ignored
    job = job_config(cfg, tmp_path / "v2", str(tiny_lm), ["author_2"], earlier, retrain=False)
    task = CausalLM(job, job.model.path)
    assert {r["source_id"] for r in task.data.forget} == {"author_2"} and len(task.data.forget) > 1  # windows
    assert {r["source_id"] for r in task.data.retain} == {"author_1", "author_3", "author_5"}
    assert [r["id"] for r in CausalLM.token_rows(job)[1]["retain"]] == task.row_ids("retain")
    assert len(task.streams(folder=tmp_path / "tokens")["retain"]) == len(task.data.retain)
    with pytest.raises(DataError, match=r"^1 forget ids were forgotten by an earlier version") as err:
        CausalLM(
            job_config(cfg, tmp_path / "v3", str(tiny_lm), ["author_1", "author_4"], earlier, retrain=False),
            str(tiny_lm),
        )
    assert "\n" not in str(err.value)

    rows = [json.loads(line) for line in (TOFU / "full.jsonl").read_text().splitlines()[:44]]
    pairs, held = tmp_path / "pairs.jsonl", tmp_path / "held.jsonl"  # rows 0..39 trained on, 40..43 held out
    for path, part in ((pairs, rows[:40]), (held, rows[40:])):
        path.write_text("".join(json.dumps({"q": r["question"], "a": r["answer"]}) + "\n" for r in part))
    cfg = load_config("configs/text.yaml", text_overrides(tiny_lm, pairs, held, tmp_path / "out", **{
        "data.text_column": "null", "data.prompt_column": "q", "data.answer_column": "a"}))  # fmt: skip
    earlier = [0, 1, 2, 39, 400, "38"]  # 400: no such row
    job = job_config(cfg, tmp_path / "v2", str(tiny_lm), [5, 7], earlier, retrain=False)
    task = CausalLM(job, job.model.path)
    assert [r["id"] for r in task.data.forget] == [5, 7]
    assert task.row_ids("retain") == [3, 4, 6, *range(8, 38)]
    assert [r["question"] for r in task.data.retain] == [rows[i]["question"] for i in task.row_ids("retain")]
    with pytest.raises(
        DataError, match=r"^1 forget ids were forgotten by an earlier version .*e\.g\. \['39'\]"
    ):
        CausalLM(
            job_config(cfg, tmp_path / "v3", str(tiny_lm), [5, "39"], earlier, retrain=False), str(tiny_lm)
        )


def _version(folder, name, parent, value, ledger, batch, cumulative):
    """A version folder as `request process` publishes it (a one-tensor model), recorded in ``ledger``."""
    stage = folder / name
    (stage / "model").mkdir(parents=True)
    save_file({"w": torch.full((3,), value)}, stage / "model" / "model.safetensors")
    (stage / "config.yaml").write_text("seed: 0\n")
    source = folder / parent / "model" if parent != "original" else folder / "original"
    write_receipt(stage, forget={"kind": "ids"}, input_model=str(source), revision=None, outputs={"model": "model"},
                  method={"name": "scrub"}, metrics={}, started_at="t")  # fmt: skip
    receipt = json.loads((stage / "receipt.json").read_text())
    previous = folder / parent / "receipt.json" if parent != "original" else None
    receipt["chain"] = chain_section(name, parent, "unlearn", previous, batch, cumulative)
    (stage / "receipt.json").write_text(json.dumps(receipt, indent=2))
    ledger.add(batch)
    ledger.claim()
    ledger.publish(name, parent=parent, made_by="unlearn", forget_hash_batch=ids_sha256(batch),
                   forget_hash_cumulative=ids_sha256(cumulative), receipt_sha256=sha256_file(stage / "receipt.json"),
                   folder=str(stage))  # fmt: skip


@pytest.fixture
def chain(tmp_path):
    folder = tmp_path / "stream"
    (folder / "original").mkdir(parents=True)
    save_file({"w": torch.zeros(3)}, folder / "original" / "model.safetensors")
    ledger = Ledger(folder / "ledger.sqlite")
    _version(folder, "v1", "original", 1.0, ledger, [1, 2], [1, 2])
    _version(folder, "v2", "v1", 2.0, ledger, [3], [1, 2, 3])
    _version(folder, "v3", "v2", 3.0, ledger, [4, 5], [1, 2, 3, 4, 5])
    ledger.close()
    return folder


def test_chain_holds(chain, capsys):
    assert len(verify_chain(chain)) == 3
    assert len(verify_chain(chain, "v2")) == 2
    assert main(["verify", "--chain", str(chain), "v3"]) == 0
    assert "the chain of" in capsys.readouterr().out


@pytest.mark.parametrize("at", [len("{\n  "), -3])  # a byte of the JSON's syntax; a byte inside a value
def test_one_flipped_byte_fails_at_that_link(chain, capsys, at):
    path = chain / "v1" / "receipt.json"
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="the chain breaks at v1 "):
        verify_chain(chain)
    assert main(["verify", "--chain", str(chain)]) == 1
    assert "the chain breaks at v1 " in capsys.readouterr().err


def test_changed_model_or_link_fails_there(chain):
    save_file({"w": torch.full((3,), 9.0)}, chain / "v2" / "model" / "model.safetensors")
    with pytest.raises(VerifyError, match="the chain breaks at v2 .*not a model this receipt names"):
        verify_chain(chain)
    assert len(verify_chain(chain, "v1")) == 1  # the links before it still hold


def test_chain_without_ledger_checks_the_hash_links(chain):
    (chain / "ledger.sqlite").unlink()
    assert len(verify_chain(chain)) == 3
    receipt = json.loads((chain / "v2" / "receipt.json").read_text())
    receipt["metrics"] = {"forget_error": 1.0}  # the receipt rewritten: v3's previous hash no longer holds
    (chain / "v2" / "receipt.json").write_text(json.dumps(receipt))
    with pytest.raises(VerifyError, match="the chain breaks at v3 .*previous_receipt_sha256"):
        verify_chain(chain)


def test_process_with_nothing_pending_and_verify_without_arguments(tmp_path, capsys):
    args = ["configs/demo.yaml", f"output_dir={tmp_path / 'stream'}", "model.path=m"]
    assert main(["request", "process", *args]) == 0
    assert "no pending requests" in capsys.readouterr().out
    assert main(["verify"]) == 2
    assert "needs RECEIPT and MODEL_DIR (or --chain" in capsys.readouterr().err
    assert main(["verify", "--chain", str(tmp_path / "stream")]) == 2
    assert "holds no version folders" in capsys.readouterr().err


def test_release_puts_running_requests_back(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    first, second = ledger.add([1, 2]), ledger.add([3])
    assert ledger.release() == (None, [])
    name, _ = ledger.claim()
    assert ledger.release() == (name, [first, second])
    assert [r["state"] for r in ledger.requests()] == ["pending", "pending"]
    assert all(r["version"] is None for r in ledger.requests())
    name, _ = ledger.claim()  # claimed again, recorded: no longer releasable
    ledger.publish(name, parent="original", made_by="unlearn", forget_hash_batch="b", forget_hash_cumulative="c",
                   receipt_sha256="r", folder="f")  # fmt: skip
    third = ledger.add([4])
    ledger.claim()
    ledger.db.execute("INSERT INTO versions VALUES ('v2', 2, 't', 'v1', 'unlearn', 'b', 'c', 'r', 'f')")
    with pytest.raises(LedgerError, match="v2 is already recorded"):
        ledger.release()
    assert ledger.requests("running")[0]["id"] == third
    ledger.close()


def test_release_command_clears_the_failed_job(tiny_cifar, tmp_path, capsys):
    args = ["configs/demo.yaml", *tiny_overrides(tiny_cifar, tmp_path, output_dir=tmp_path / "out")]
    ids = tmp_path / "ids.txt"
    ids.write_text("1\n2\n")
    assert main(["request", "add", *args, "--ids", str(ids)]) == 0
    Ledger(tmp_path / "out" / "ledger.sqlite").claim()
    stale = tmp_path / "out" / ".jobs" / "v1.partial"
    stale.mkdir(parents=True)
    keep = tmp_path / "out" / ".jobs" / "v10"  # another version's name that starts the same: not touched
    keep.mkdir()
    assert main(["request", "release", *args]) == 0
    assert "released requests 1 (were v1): pending again" in capsys.readouterr().out
    assert not stale.exists() and keep.exists()
    assert [r["state"] for r in Ledger(tmp_path / "out" / "ledger.sqlite").requests()] == ["pending"]
    Ledger(tmp_path / "out" / "ledger.sqlite").claim()
    (tmp_path / "out" / "v1").mkdir()  # published, not yet recorded: only `process` may finish it
    assert main(["request", "release", *args]) == 2  # LedgerError's exit status
    assert "v1 is published but not yet recorded" in capsys.readouterr().err


def test_forgotten_scores_by_hand():
    """The cumulative forget set's error, the class-weighted error of unseen examples of its classes (the
    drift reference of ledger.retrain_bound), and the attack on it."""
    import numpy as np

    from engine.data.vision import ImageSet
    from engine.eval.metrics import forgotten_scores

    def images(labels):
        return ImageSet(
            torch.zeros(len(labels), 3, 2, 2, dtype=torch.uint8),
            torch.tensor(labels),
            list(range(len(labels))),
        )

    class Data:
        forgotten = images([0] * 9 + [1] * 3)  # nine of class 0, three of class 1
        val = images([0, 0, 1, 1, 2])  # class 0: 50% wrong, class 1: 100%, class 2: 0% (below)
        retain = images([0, 1, 2])

    class WholeClass(Data):
        retain = images([1, 2])  # no class 0 left to train on: a model that never saw it gets it 100% wrong

    test_labels = np.array([0, 1] * 10 + [2] * 5)
    p = {
        "forgotten": {"correct": np.array([1.0, 0.0, 0.0] * 4), "loss": np.linspace(2.0, 3.0, 12)},  # 8 wrong
        "val": {"correct": np.array([1.0, 0.0, 0.0, 0.0, 1.0])},
        "test": {"loss": np.r_[np.linspace(0.0, 1.0, 20), np.full(5, 9.0)]},  # class 2's 9.0 is not compared
    }
    out = forgotten_scores(p, Data, test_labels, attacks=True, seed=0)
    assert out["forgotten_error"] == pytest.approx(100 * 8 / 12)
    assert out["forgotten_val_error"] == pytest.approx(100 * (0.75 * 0.5 + 0.25 * 1.0))  # class 2 not weighed
    assert out["forgotten_mia"] == pytest.approx(100.0)  # separable by loss once class 2 is left out
    assert "forgotten_mia" not in forgotten_scores(p, Data, test_labels, attacks=False, seed=0)
    whole = forgotten_scores(p, WholeClass, test_labels, attacks=False, seed=0)
    assert whole["forgotten_val_error"] == pytest.approx(100 * (0.75 * 1.0 + 0.25 * 1.0))
