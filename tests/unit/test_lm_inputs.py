"""Language-model inputs: prompt masking, the chat template, config switches and refusals with clear messages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.config import load_config
from engine.data.text import IGNORE, QAFormatter
from engine.data.tofu import prepare_tofu
from engine.errors import ConfigError, DataError, ModelError
from engine.models.causal_lm import check_vocab, load_causal_lm, load_tokenizer, set_dropout
from engine.testing import build_tiny_llama
from tests.conftest import TOFU


def test_prompt_is_masked_and_answer_ends_with_eos(tiny_lm):
    tok = load_tokenizer(str(tiny_lm))
    enc = QAFormatter(tok, max_length=256).encode("Who is he?", "A writer.")
    prompt = tok("Question: Who is he?\nAnswer:")["input_ids"]
    assert enc["input_ids"][: len(prompt)] == prompt
    assert enc["labels"][: len(prompt)] == [IGNORE] * len(prompt)
    assert enc["labels"][len(prompt) :] == enc["input_ids"][len(prompt) :]
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(enc["input_ids"][len(prompt) : -1]).strip() == "A writer."


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny_lm):
    tok = load_tokenizer(str(tiny_lm))
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" + (
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    fmt = QAFormatter(tok, max_length=256)
    assert fmt.use_chat
    enc = fmt.encode("Who is he?", "A writer.")
    prompt = fmt.prompt_ids("Who is he?")
    assert tok.decode(prompt) == "<s>user: Who is he?\n<s>assistant: "
    assert enc["labels"][: len(prompt)] == [IGNORE] * len(prompt)
    assert not QAFormatter(tok, chat_template="off").use_chat


def test_refusals(tiny_lm):
    tok = load_tokenizer(str(tiny_lm))
    with pytest.raises(DataError, match="no chat template"):
        QAFormatter(tok, chat_template="on")
    with pytest.raises(DataError, match="raise max_length"):
        QAFormatter(tok, max_length=8).encode("A question that is long enough to fill the limit?", "x")
    small = build_tiny_llama(16)
    with pytest.raises(ModelError, match="use the tokenizer saved with this checkpoint"):
        check_vocab(small, tok, "tiny")
    with pytest.raises(ModelError, match="pin it with model.revision"):
        load_causal_lm(str(tiny_lm), trust_remote_code=True)
    with pytest.raises(ModelError, match="cannot load a causal LM"):
        load_causal_lm(str(tiny_lm / "missing"))
    cfg = SimpleNamespace(dataset=str(TOFU), forget_split="forget10", num_authors=3, utility_examples=None)
    prepare_tofu(cfg)  # 3 authors: 1 forgotten, 2 kept
    with pytest.raises(DataError, match="does not exist"):
        prepare_tofu(SimpleNamespace(**{**vars(cfg), "dataset": str(TOFU.parent / "cifar10")}))
    with pytest.raises(ConfigError, match="no dropout"):
        set_dropout(build_tiny_llama(16).model.norm, 0.1)


def test_set_dropout_reaches_the_attention_layers():
    model = build_tiny_llama(16)
    assert set_dropout(model, 0.2) == 2  # one per decoder layer's attention
    assert all(layer.self_attn.attention_dropout == 0.2 for layer in model.model.layers)


def test_method_switch_on_the_command_line():
    cfg = load_config("configs/tofu.yaml", ["method=npo", "method.beta=0.2"])
    assert cfg.method.name == "npo" and cfg.method.beta == 0.2 and cfg.method.lr == 1e-5
    with pytest.raises(ConfigError, match="pass method=NAME"):
        load_config("configs/tofu.yaml", ["method.name=npo"])  # SCRUB's keys stay: refused, with the way out


@pytest.mark.parametrize("split,authors", [("forget01", 2), ("forget05", 10), ("forget10", 20)])
def test_whole_tofu_splits_are_the_hub_forget_retain_and_holdout_files(split, authors):
    import json

    cfg = SimpleNamespace(dataset=str(TOFU), forget_split=split, num_authors=None, utility_examples=None)
    data = prepare_tofu(cfg)
    suffix = {"forget01": "99", "forget05": "95", "forget10": "90"}[split]

    def questions(name):
        return [json.loads(line)["question"] for line in (TOFU / f"{name}.jsonl").read_text().splitlines()]

    assert [r["question"] for r in data.forget] == questions(split)
    assert [r["question"] for r in data.retain] == questions(f"retain{suffix}")
    assert [r["question"] for r in data.holdout] == questions(split.replace("forget", "holdout"))
    assert len(data.forget) == authors * 20 and data.forget_authors == authors
    assert len(data.retain_eval) == 400  # retain_perturbed: the first 20 authors, all retained
