"""Every bad input gets a clear error before any training starts, and nothing half-written is left
where a result is expected."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.artifacts.export import staged_dir
from engine.cli import main
from engine.config import load_config
from engine.data.vision import prepare_data
from engine.errors import ConfigError, DataError, ModelError, OutputError
from engine.models.loading import load_classifier
from engine.models.vision import build_vision_model
from engine.testing import tiny_overrides


def data_for(tiny_cifar, tmp_path, **extra):
    cfg = load_config(None, tiny_overrides(tiny_cifar, tmp_path, **extra))
    return prepare_data(cfg.data, cfg.forget)


def test_forget_ids_missing_from_the_data_are_counted_and_shown(tiny_cifar, tmp_path):
    with pytest.raises(DataError) as err:
        data_for(tiny_cifar, tmp_path, **{"forget.kind": "ids", "forget.ids": "[99999, 99998, 1]"})
    msg = str(err.value)
    assert "2 of 3 forget ids are not in the training data" in msg and "99999" in msg and "99998" in msg


def test_forget_ids_from_a_file_and_duplicates(tiny_cifar, tmp_path):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("5\n5\n")
    with pytest.raises(DataError, match="more than once"):
        data_for(tiny_cifar, tmp_path, **{"forget.kind": "ids", "forget.ids_file": str(ids_file)})


def test_forget_ids_select_exactly_those_examples(tiny_cifar, tmp_path):
    full = data_for(tiny_cifar, tmp_path, **{"forget.label": "0"})
    wanted = full.retain.ids[:3]
    data = data_for(tiny_cifar, tmp_path, **{"forget.kind": "ids", "forget.ids": str(wanted)})
    assert sorted(data.forget.ids) == sorted(wanted)
    assert not set(data.forget.ids) & set(data.retain.ids)
    assert len(data.forget) + len(data.retain) == len(full.forget) + len(full.retain)


def test_empty_forget_set(tiny_cifar, tmp_path):
    with pytest.raises(DataError, match="forget set is empty"):
        data_for(tiny_cifar, tmp_path, **{"forget.kind": "random", "forget.fraction": "0.001"})


def test_empty_retain_set(tiny_cifar, tmp_path):
    with pytest.raises(DataError, match="retain set is empty"):
        data_for(tiny_cifar, tmp_path, **{"data.classes": "[0]", "forget.label": "0"})


@pytest.mark.parametrize("label", ["unicorn", "7"])
def test_unknown_class(tiny_cifar, tmp_path, label):
    with pytest.raises(DataError, match="unknown class"):
        data_for(tiny_cifar, tmp_path, **{"forget.label": label})


def test_class_by_name_and_validation_hold_out(tiny_cifar, tmp_path):
    data = data_for(tiny_cifar, tmp_path, **{"forget.label": "automobile"})
    assert data.forget_classes == [1] and set(data.forget.labels.tolist()) == {1}
    assert len(data.val) == 3 * 10  # 20% of 50 per class, held out per class
    assert len(data.forget) == 40 and len(data.forget_val) == 10
    assert not set(data.val.ids) & (set(data.forget.ids) | set(data.retain.ids))


def test_selective_and_random_are_seeded(tiny_cifar, tmp_path):
    a = data_for(
        tiny_cifar, tmp_path, **{"forget.kind": "selective", "forget.label": "2", "forget.count": "7"}
    )
    b = data_for(
        tiny_cifar, tmp_path, **{"forget.kind": "selective", "forget.label": "2", "forget.count": "7"}
    )
    c = data_for(
        tiny_cifar,
        tmp_path,
        **{"forget.kind": "selective", "forget.label": "2", "forget.count": "7", "forget.seed": "1"},
    )
    assert a.forget.ids == b.forget.ids != c.forget.ids and len(a.forget) == 7
    r = data_for(tiny_cifar, tmp_path, **{"forget.kind": "random", "forget.fraction": "0.1"})
    assert len(r.forget) == 12  # 10% of 120 training rows


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("method.alpah=0.5", "did you mean 'alpha'"),
        ("bogus.key=1", "unknown key 'bogus'"),
        ("method.temperature=-1", "method.temperature"),
        ("forget.kind=everything", "forget.kind"),
        ("method.msteps=9", "msteps"),
        ("novalue", "not key=value"),
    ],
)
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_checkpoint_class_count_must_match_the_data(tmp_path):
    build_vision_model("preact_resnet18", num_labels=10, width=0.125).save_pretrained(tmp_path / "ten")
    with pytest.raises(ModelError, match="predicts 10 classes but the data has 3"):
        load_classifier(str(tmp_path / "ten"), num_labels=3)


def test_remote_code_needs_a_pinned_revision(tmp_path):
    with pytest.raises(ModelError, match="revision"):
        load_classifier(str(tmp_path), num_labels=3, trust_remote_code=True)


def test_output_dir_with_results_is_refused_and_staging_is_atomic(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    with pytest.raises(OutputError, match="already holds results"):
        with staged_dir(out, overwrite=False):
            pass
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with staged_dir(fresh, overwrite=False) as stage:
            (stage / "report.json").write_text("half")
            raise RuntimeError("killed mid-run")
    assert not fresh.exists()  # nothing where the result is expected
    with staged_dir(out, overwrite=True) as stage:
        (stage / "report.json").write_text("new")
    assert (out / "report.json").read_text() == "new" and not (tmp_path / "out.partial").exists()


def test_cli_refuses_bad_input_before_training(tiny_cifar, tmp_path, capsys):
    """The CLI reports the error in one line, exits 2, and has written no result."""
    over = tiny_overrides(tiny_cifar, tmp_path, **{"forget.label": "unicorn"})
    assert main(["train", "configs/demo.yaml", *over]) == 2
    assert "unknown class 'unicorn'" in capsys.readouterr().err
    assert not Path(tmp_path / "out").exists()
    assert main(["run", "configs/demo.yaml", *over[:-1], "model.path=" + str(tmp_path / "nothing-here")]) == 2


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


@pytest.mark.parametrize(
    "overrides, named",
    [(["task=causal_lm", "data.preset=tofu", "method=eu_k"],
      re.escape("method=eu_k needs a classifier head (class logits it edits or reads per class), which task=causal_lm "
                "does not provide; with task=causal_lm use one of scrub, grad_ascent, grad_diff, npo, rmu, simnpo, "
                "undial, idk_nll, idk_dpo, finetune, neggrad_plus")),
     (["task=causal_lm", "data.text_column=text", "method=bad_teacher"], "method=bad_teacher needs a classifier head"),
     (["task=tofu", "method=finetune", "method.augment=true"], "method.augment .* is for images"),
     (["task=causal_lm", "data.text_column=text", "data.prompt_column=q", "data.answer_column=a"],
      "data.text_column .* and data.prompt_column / data.answer_column .* are two ways to read rows: set one of them"),
     (["task=causal_lm"], "task=causal_lm reads data.dataset as raw documents"),
     (["task=causal_lm", "data.text_column=text", "forget.kind=where"], "forget.kind=where needs forget.where"),
     (["task=causal_lm", "data.text_column=text", "forget.kind=class"], "forget.kind=class needs labels"),
     (["data.text_column=text"], "data.text_column is for text data: set task=causal_lm"),
     (["data.preset=tofu"], "data.preset=tofu holds text: set task=causal_lm")],
)  # fmt: skip
def test_a_method_the_task_cannot_serve_is_refused_in_one_place(overrides, named):
    """engine/config.py reads each method's `needs` against the task's PROVIDES (engine/tasks)."""
    with pytest.raises(ConfigError, match=named):
        load_config(None, overrides)
    # the paired and teacher methods serve both tasks; the earlier task names still read
    for task, method in (("image_classification", "npo"), ("image_classification", "grad_diff"),
                         ("tofu", "neggrad_plus"), ("tofu", "finetune"), ("vision", "eu_k"),
                         ("tofu", "scrub")):  # fmt: skip
        cfg = load_config(None, [f"task={task}", f"method={method}"])
        assert cfg.method.name == method and cfg.task in ("image_classification", "causal_lm")
    assert load_config(None, ["task=tofu"]).data.preset == "tofu"


def test_retain_ids_select_exactly_those_examples(tiny_cifar, tmp_path):
    full = data_for(tiny_cifar, tmp_path, **{"forget.label": "0"})
    forget_ids = full.retain.ids[:3]
    retain_ids = full.retain.ids[3:13] + full.forget.ids[:2]
    ids_file = tmp_path / "retain.txt"
    ids_file.write_text("\n".join(map(str, retain_ids[5:])))
    extra = {"forget.kind": "ids", "forget.ids": str(forget_ids)}
    for given in ({"forget.retain_ids": str(retain_ids)},
                  {"forget.retain_ids": str(retain_ids[:5]), "forget.retain_ids_file": str(ids_file)}):  # fmt: skip
        data = data_for(tiny_cifar, tmp_path, **extra, **given)
        assert sorted(data.forget.ids) == sorted(forget_ids)
        assert sorted(data.retain.ids) == sorted(retain_ids)  # D_r is exactly those, not the complement
        assert len(data.train) == 15 and "retain_ids_sha256" in data.forget_summary()
    assert "retain_ids_sha256" not in data_for(tiny_cifar, tmp_path, **extra).forget_summary()


def test_retain_ids_overlapping_the_forget_ids_are_counted_and_shown(tiny_cifar, tmp_path):
    full = data_for(tiny_cifar, tmp_path, **{"forget.label": "0"})
    ids = full.retain.ids
    with pytest.raises(DataError) as err:
        data_for(
            tiny_cifar,
            tmp_path,
            **{"forget.kind": "ids", "forget.ids": str(ids[:3]), "forget.retain_ids": str(ids[1:10])},
        )
    msg = str(err.value)
    assert (
        "2 ids are in both the forget and the retain set" in msg and str(ids[1]) in msg and str(ids[2]) in msg
    )
    assert "remove them from one of the lists" in msg


@pytest.mark.parametrize(
    ("retain", "needle"),
    [
        ("[99999, {0}]", "1 of 2 retain ids are not in the training data"),
        ("[{0}, {0}]", "1 retain ids are listed more than once"),
        ("[]", "forget.retain_ids is empty"),
        ("[{val}]", "1 retain ids are in the validation hold-out"),
    ],
)
def test_bad_retain_ids(tiny_cifar, tmp_path, retain, needle):
    full = data_for(tiny_cifar, tmp_path, **{"forget.label": "0"})
    retain = retain.format(full.retain.ids[5], val=full.val.ids[0])
    with pytest.raises(DataError, match=needle):
        data_for(
            tiny_cifar,
            tmp_path,
            **{"forget.kind": "ids", "forget.ids": str(full.retain.ids[:2]), "forget.retain_ids": retain},
        )


def test_retain_ids_need_kind_ids():
    with pytest.raises(ConfigError, match="forget.retain_ids / forget.retain_ids_file need forget.kind=ids"):
        load_config(None, ["forget.kind=class", "forget.label=0", "forget.retain_ids=[1,2]"])


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    from engine.models.causal_lm import check_vocab
    from engine.testing import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(["Who wrote the book?", "The author Jaime Vasquez wrote it."] * 4)
    check_vocab(build_tiny_llama(len(tokenizer)), tokenizer, "ok")  # the tokenizer it was built with
    with pytest.raises(ModelError) as err:
        check_vocab(build_tiny_llama(len(tokenizer) - 10), tokenizer, str(tmp_path))
    msg = str(err.value)
    assert f"has {len(tokenizer)} tokens but the model's embedding has {len(tokenizer) - 10} rows" in msg
    assert "use the tokenizer saved with this checkpoint" in msg and "resize_token_embeddings" in msg


PICKLE_REFUSAL = "loads safetensors only and does not unpickle files it did not write"


def _save_pickled(model, folder: Path, name: str) -> Path:
    """A checkpoint as older tools wrote it: config.json + pickled weights, no safetensors (transformers 5
    always writes safetensors, so the pickle is written the way torch.save writes pytorch_model.bin)."""
    import torch

    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / name)
    return folder


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_checkpoints_are_refused(tmp_path, name):
    from engine.models.causal_lm import load_causal_lm
    from engine.testing import build_tiny_llama

    lm = _save_pickled(build_tiny_llama(64), tmp_path / "lm", name)
    with pytest.raises(ModelError, match=PICKLE_REFUSAL) as err:
        load_causal_lm(str(lm))
    assert name in str(err.value) and "AutoModelForCausalLM" in str(err.value)
    assert "save_pretrained(OUT, safe_serialization=True)" in str(err.value)
    net = build_vision_model("preact_resnet18", num_labels=3, width=0.125)
    classifier = _save_pickled(net, tmp_path / "classifier", name)
    with pytest.raises(ModelError, match=PICKLE_REFUSAL) as err:
        load_classifier(str(classifier), num_labels=3)
    assert "AutoModelForImageClassification" in str(err.value)
    net.save_pretrained(classifier)  # with model.safetensors beside the pickle, the safetensors load
    assert load_classifier(str(classifier), num_labels=3).config.num_labels == 3


@pytest.mark.parametrize(
    "command, config, overrides, named",
    [("train", "configs/demo.yaml", ["backend.name=ray"],
      "`unlearn train` of task=image_classification runs on backend.name=single or deepspeed; backend.name=ray runs "
      "`unlearn run|eval` of task=image_classification"),
     ("audit", "configs/demo.yaml", ["backend.name=deepspeed"],
      "`unlearn audit` of task=image_classification runs on backend.name=single; backend.name=deepspeed runs "
      "`unlearn train|run|eval` of task=image_classification"),
     ("audit", "configs/tofu.yaml", [],
      "`unlearn audit` runs with task=image_classification, not task=causal_lm")],
)  # fmt: skip
def test_a_backend_the_command_does_not_run_on_is_refused_in_one_line_before_any_work(
    command, config, overrides, named, tmp_path, capsys
):
    """engine/recipes/__init__.py is the one table of what runs where; the CLI reads it before any work."""
    out = tmp_path / "out"
    assert main([command, config, *overrides, f"output_dir={out}", "model.path=" + str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {named}"
    assert not out.exists() and not out.with_name("out.partial").exists()
