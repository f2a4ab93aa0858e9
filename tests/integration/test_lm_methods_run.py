"""SimNPO, UNDIAL, IdkNLL and IdkDPO end to end: `unlearn run configs/tofu.yaml method=NAME` for one epoch on the
tiny Llama and real TOFU rows (1 of 10 authors forgotten). SimNPO and UNDIAL push the forget answers' NLL up; the
idk methods teach each forget question its "I don't know" answer (TOFU's idontknow.jsonl, chosen per row from the
seed), whose NLL falls. A LoRA UNDIAL run leaves its teacher (the base weights, adapters off) bit-identical."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.cli import main
from engine.data.paired import IdkAnswers
from engine.data.text import QAFormatter, TextStream
from engine.data.tofu import load_idk_answers, prepare_tofu
from engine.models.causal_lm import load_causal_lm, load_tokenizer
from engine.tasks.causal_lm import answer_nll
from engine.testing import tofu_overrides
from tests.conftest import TOFU

pytestmark = pytest.mark.slow

# 5 steps of 4 forget rows at a learning rate that moves the tiny model within one epoch
RUN = {"eval.reference": "null", "method.epochs": "1", "method.lr": "0.003", "method.batch_size": "4",
       "tofu.utility_examples": "4"}  # fmt: skip


@pytest.fixture(scope="module")
def original(tiny_lm, tmp_path_factory) -> Path:
    """`unlearn train --only original`: the tiny Llama fine-tuned on the 10 authors for 6 epochs, so that it knows
    its forget answers (what SimNPO and UNDIAL push away)."""
    models = tmp_path_factory.mktemp("lm_methods") / "models"
    over = tofu_overrides(tiny_lm, models.parent, output_dir=models, **{"train.epochs": 6})
    assert main(["train", "configs/tofu.yaml", *over, "--only", "original"]) == 0
    return models / "original"


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def idk_nll(model_path: Path, tokenizer_path: Path) -> float:
    """The mean NLL per token of the forget questions' "I don't know" answers, as the idk methods chose them
    (seed 0, 10 authors: the run's settings)."""
    tok = load_tokenizer(str(tokenizer_path))
    fmt = QAFormatter(tok, max_length=192)
    cfg = SimpleNamespace(dataset=str(TOFU), forget_split="forget10", num_authors=10, utility_examples=4)
    forget = prepare_tofu(cfg).forget
    idk = IdkAnswers(forget, load_idk_answers(str(TOFU)), fmt, seed=0)
    rows = [{**r, "answer": idk.answer(i)} for i, r in enumerate(forget)]
    return answer_nll(load_causal_lm(str(model_path)), TextStream(rows, fmt, tok.pad_token_id), 32, "cpu")


# SimNPO's sigmoid saturates at this tiny model's per-token NLL (about 4 nats; beta 4.5 leaves a gradient of
# sigma(-18)): beta 0.5 and its forget term weighed as the retain term give it one here
EXTRA = {"simnpo": {"method.gamma": "1.0", "method.beta": "0.5"}}


@pytest.mark.parametrize("method", ["simnpo", "undial", "idk_nll", "idk_dpo"])
def test_each_method_unlearns_in_one_epoch(original, tiny_lm, tmp_path, method):
    out = tmp_path / method
    extra = {**RUN, **EXTRA.get(method, {}), "model.path": original}
    args = tofu_overrides(tiny_lm, tmp_path, output_dir=out, method=method, **extra)
    assert main(["run", "configs/tofu.yaml", *args]) == 0
    history = report(out)["history"]
    forget = (
        history[-1]["forget_nll"] - history[0]["forget_nll"]
    )  # per token, what the run did to the forget answers
    if method == "idk_nll":  # its idk answers learnt
        idk = idk_nll(out / "model", tiny_lm) - idk_nll(original, tiny_lm)
        assert idk < -0.1, f"idk answers' NLL moved {idk:+.3f}"
    elif method == "idk_dpo":  # the preference margin: the forget answers fall far below the idk answers
        idk = idk_nll(out / "model", tiny_lm) - idk_nll(original, tiny_lm)
        assert forget > idk + 0.1, f"forget NLL {forget:+.3f}, idk answers' NLL {idk:+.3f}"
    else:  # the forget answers' NLL rises, and more than the retain answers' (not a drift of everything)
        gap = [h["forget_nll"] - h["retain_nll"] for h in history]
        assert forget > 0.05 and gap[-1] > gap[0], f"{method}: forget NLL moved {forget:+.3f}: {history}"


def test_a_lora_undial_run_keeps_its_teacher_bit_identical(tiny_lm, tmp_path):
    out = tmp_path / "lora"
    lora = {"model.lora.rank": "4", "model.lora.alpha": "16"}
    args = tofu_overrides(tiny_lm, tmp_path, output_dir=out, method="undial", **RUN, **lora)
    assert main(["run", "configs/tofu.yaml", *args]) == 0
    r = report(out)
    teacher = r["teacher"]
    assert teacher is not None and teacher["unchanged"] is True
    assert teacher["sha256_before"] == teacher["sha256_after"]
    history = r["history"]
    assert history[-1]["forget_nll"] > history[0]["forget_nll"], history
    before = load_causal_lm(str(tiny_lm)).state_dict()
    after = load_causal_lm(str(out / "model")).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the merged adapters moved nothing"
