"""Every user mistake is one line on stderr (``error: ...``, naming the offending thing) and exit status 2, before
any work: no run folder is made and no model is written. Each case goes through the CLI as a user meets it.
(Bad keys and bad forget ids are in test_bad_inputs.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from engine.cli import main
from engine.models.vision import build_vision_model
from engine.testing import text_overrides, tiny_overrides, write_author_documents


def refused(capsys, argv: list[str], *named: str, out: Path | None = None) -> str:
    """Run the CLI; assert exit 2 and one stderr line ``error: ...`` naming each of ``named``; with ``out``, assert
    that neither it nor its staging folder was made. Returns the line."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    for text in named:
        assert text in lines[0], (text, lines[0])
    if out is not None:
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return lines[0]


@pytest.fixture
def classifier(tmp_path) -> Path:
    build_vision_model("preact_resnet18", num_labels=3, width=0.125).save_pretrained(tmp_path / "classifier")
    return tmp_path / "classifier"


@pytest.fixture
def docs(tmp_path) -> tuple[Path, Path]:
    return write_author_documents(tmp_path / "docs", range(0, 4), range(4, 6))


def image_run(tiny_cifar, tmp_path, model: Path | str, **extra) -> list[str]:
    over = {"model.path": str(model), "eval.reference": "null", "method.epochs": "1", **extra}
    return ["run", "configs/demo.yaml", *tiny_overrides(tiny_cifar, tmp_path, **over)]


def lm_run(model: Path | str, docs: tuple[Path, Path], out: Path, command: str = "run", **extra) -> list[str]:
    return [command, "configs/text.yaml", *text_overrides(model, *docs, out, **extra)]


def damage(folder: Path, how: str) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage" * 64)


# ----------------------------------------------------------------------------- configs that do not parse


@pytest.mark.parametrize(
    "text, overrides, named",
    [("seed: [1, 2\nmodel: x\n", [], ("line 2, column 6: not valid YAML",)),
     ("- just\n- a list\n", [], ("the top level must be a mapping",)),
     (b"seed: \xff\xfe\n", [], ("cannot be read",)),
     ("seed: 0\n", ["forget.ids=[1,2"], ("override 'forget.ids=[1,2': the value is not valid YAML",)),
     ("seed: 0\n", ["method.msteps=9", "seedd=1"],
      ("method: msteps (9) cannot exceed epochs", "unknown key 'seedd' (did you mean 'seed'?)")),
     ("seed: 0\n", ["model.gradient_checkpointing=true"], ("model.gradient_checkpointing is for causal LMs",)),
     ("seed: 0\n", ["model.lora.rank=0"], ("model.lora.rank",)),
     ("seed: 0\n", ["model.lora.rank=4", "method.param_distance=0.5"], ("method.param_distance", "model.lora")),
     ("seed: 0\n", ["method.teacher_cache=sometimes"], ("method.teacher_cache", "'auto' or 'off'"))],
)  # fmt: skip
def test_a_config_that_does_not_parse_or_validate_is_one_line(text, overrides, named, tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out"
    line = refused(capsys, ["run", str(config), *overrides, f"output_dir={out}"], *named, out=out)
    assert "Traceback" not in line


def test_a_config_that_is_neither_a_file_nor_a_shipped_name(tmp_path, capsys):
    refused(
        capsys, ["run", str(tmp_path / "nope.yaml")], "nope.yaml' does not exist", "demo, ", "unlearn configs"
    )


# ----------------------------------------------------------------------------- damaged weight files


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_classifier_weights(how, tiny_cifar, tmp_path, classifier, capsys):
    damage(classifier, how)
    refused(capsys, image_run(tiny_cifar, tmp_path, classifier), "model.path", str(classifier),
            "model.safetensors is damaged or truncated", out=tmp_path / "out")  # fmt: skip


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_causal_lm_weights(how, tiny_lm, docs, tmp_path, capsys):
    model = shutil.copytree(tiny_lm, tmp_path / "lm")
    damage(model, how)
    out = tmp_path / "out"
    refused(
        capsys, lm_run(model, docs, out), str(model), "model.safetensors is damaged or truncated", out=out
    )


@pytest.mark.parametrize("task", ["image", "lm"])
def test_damaged_weights_are_refused_by_train_before_its_run_folder_is_made(task, tiny_cifar, tiny_lm, docs, tmp_path,
                                                                            classifier, capsys):  # fmt: skip
    """`unlearn train` fine-tunes model.path (an image classifier without model.arch, a causal LM)."""
    out = tmp_path / "out"
    if task == "image":
        damage(classifier, "truncated")
        argv = ["train", "configs/demo.yaml", *tiny_overrides(tiny_cifar, tmp_path, **{"model.arch": "null",
                                                                                     "model.path": str(classifier)})]  # fmt: skip
    else:
        model = shutil.copytree(tiny_lm, tmp_path / "lm")
        damage(model, "truncated")
        argv = lm_run(model, docs, out, command="train")
    refused(capsys, argv, "model.safetensors is damaged or truncated", out=out)


def test_a_shard_index_naming_a_missing_file(tiny_lm, docs, tmp_path, capsys):
    model = shutil.copytree(tiny_lm, tmp_path / "lm")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(capsys, lm_run(model, docs, tmp_path / "out"), "model-00002-of-00002.safetensors", "missing",
            out=tmp_path / "out")  # fmt: skip


# ----------------------------------------------------------------------------- output folders


def test_an_output_dir_under_a_file(tiny_cifar, tmp_path, classifier, capsys):
    (tmp_path / "results").write_text("a file, not a folder")
    out = tmp_path / "results" / "run1"
    argv = image_run(tiny_cifar, tmp_path, classifier, output_dir=str(out))
    refused(capsys, argv, f"output_dir '{out}' cannot be created", f"'{tmp_path / 'results'}' is a file")
    assert (tmp_path / "results").read_text() == "a file, not a folder"


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_an_output_dir_that_is_a_file(overwrite, tiny_cifar, tmp_path, classifier, capsys):
    """Even with overwrite=true: overwrite replaces a run folder, never a file that is in the way."""
    out = tmp_path / "out"
    out.write_text("my notes")
    argv = image_run(tiny_cifar, tmp_path, classifier, overwrite=overwrite)
    refused(capsys, argv, f"output_dir '{out}' is a file, not a folder")
    assert out.read_text() == "my notes" and not (tmp_path / "out.partial").exists()


# ----------------------------------------------------------------------------- missing columns


def test_a_csv_without_the_text_column(tiny_lm, docs, tmp_path, capsys):
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("author,body\nauthor_0,some text\nauthor_1,more text\n")
    out = tmp_path / "out"
    refused(capsys, lm_run(tiny_lm, (corpus, docs[1]), out), str(corpus), "no column 'text'", "data.text_column",
            "author", out=out)  # fmt: skip


def test_a_json_without_the_answer_column(tiny_lm, docs, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"author": f"author_{i}", "question": "Who?", "reply": "Me."}) + "\n"
                             for i in range(3)))  # fmt: skip
    out = tmp_path / "out"
    argv = lm_run(tiny_lm, (pairs, pairs), out, **{"data.text_column": "null", "data.prompt_column": "question",
                                                   "data.answer_column": "answer"})  # fmt: skip
    refused(capsys, argv, str(pairs), "no column 'answer'", "data.answer_column", "reply", out=out)


@pytest.mark.parametrize(
    ("key", "column"), [("data.image_column", "pixels"), ("data.label_column", "fine_label")]
)
def test_an_image_dataset_without_the_named_column(key, column, tiny_cifar, tmp_path, classifier, capsys):
    argv = image_run(tiny_cifar, tmp_path, classifier, **{key: column})
    refused(capsys, argv, f"{key}={column!r} is not a column", "'img'", "'label'", out=tmp_path / "out")


# ----------------------------------------------------------------------------- hub ids that do not resolve


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Offline (the tests run with HF_HUB_OFFLINE=1) with nothing in the hub cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.parametrize("task", ["image", "lm"])
def test_a_model_hub_id_that_does_not_resolve_offline(
    task, empty_hub_cache, tiny_cifar, docs, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = image_run(tiny_cifar, tmp_path, "acme/no-such-model") if task == "image" else lm_run(
        "acme/no-such-model", docs, out)  # fmt: skip
    refused(capsys, argv, "model.path 'acme/no-such-model' is not a local folder", "HF_HUB_OFFLINE",
            "hf download acme/no-such-model --local-dir DIR", out=out)  # fmt: skip


def test_train_names_model_base_when_it_reads_model_base(empty_hub_cache, docs, tmp_path, capsys):
    """`unlearn train` fine-tunes model.base when it is set: an unreachable one is named by that key, not as
    model.path (the key `run` reads, here another folder)."""
    out = tmp_path / "out"
    argv = lm_run(
        "acme/no-such-base", docs, out, command="train", **{"model.path": str(tmp_path / "trained")}
    )
    refused(
        capsys,
        argv,
        "model.base 'acme/no-such-base' is not a local folder",
        "then set model.base=DIR",
        out=out,
    )


def test_a_model_path_that_is_neither_a_folder_nor_a_hub_id(empty_hub_cache, tiny_lm, docs, tmp_path, capsys):
    missing = tmp_path / "models" / "original"
    refused(capsys, lm_run(missing, docs, tmp_path / "out"), f"model.path '{missing}' is neither a local folder "
            "nor a hub id", out=tmp_path / "out")  # fmt: skip


def test_a_dataset_hub_id_without_a_copy_offline(tiny_cifar, tmp_path, classifier, monkeypatch, capsys):
    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("UNLEARN_DATA_MIRROR", str(tmp_path / "mirror"))
    argv = image_run("acme/no-such-data", tmp_path, classifier)
    refused(capsys, argv, "data.dataset 'acme/no-such-data'", "HF_HUB_OFFLINE", "UNLEARN_DATA_MIRROR",
            out=tmp_path / "out")  # fmt: skip


# ----------------------------------------------------------------------------- output.push_to_hub


@pytest.mark.parametrize(
    ("repo", "online", "named"),
    [("you/model", False, "needs the hub, but HF_HUB_OFFLINE is set"),
     ("not a repo!", True, "'not a repo!' is not a hub repository id"),
     ("model-without-owner", True, "names no owner"),
     ("you/model", True, "needs a hub token: run `hf auth login` or set HF_TOKEN")],
)  # fmt: skip
def test_a_push_that_cannot_happen_is_refused_before_the_run(repo, online, named, tiny_cifar, tmp_path, classifier,
                                                             monkeypatch, capsys):  # fmt: skip
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", not online)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    argv = image_run(tiny_cifar, tmp_path, classifier, **{"output.push_to_hub": repo})
    refused(capsys, argv, f"output.push_to_hub={repo!r}", named, out=tmp_path / "out")


def test_an_unreachable_hub_is_one_line_at_once(tiny_cifar, tmp_path, classifier, monkeypatch, capsys):
    """Without HF_HUB_OFFLINE and without a copy, a hub that does not answer is said in one line before `datasets`
    is asked (which retries with back-off for about 30 s, printing each retry)."""
    from engine import provenance

    monkeypatch.setenv("UNLEARN_DATA_MIRROR", str(tmp_path / "empty-mirror"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(provenance, "_REACHABLE", {})
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    out = tmp_path / "out"
    refused(capsys, image_run(tiny_cifar, tmp_path, classifier, **{"data.dataset": "uoft-cs/cifar10"}),
            "'uoft-cs/cifar10'", "the hub cannot be reached", "UNLEARN_DATA_MIRROR/cifar10", out=out)  # fmt: skip
