"""SimNPO, UNDIAL, IdkNLL and IdkDPO against values computed by hand on small tensors, the signs of their
gradients, and the paired batch that carries the "I don't know" answers (engine/data/paired.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from engine.data.paired import IdkAnswers, PairedStream, idk_choice
from engine.data.text import IGNORE, QAFormatter, TextStream, collate
from engine.data.tofu import load_idk_answers
from engine.methods import (
    IdkDpo,
    IdkDpoConfig,
    IdkNll,
    IdkNllConfig,
    SimNpo,
    SimNpoConfig,
    Undial,
    UndialConfig,
)
from engine.methods.losses import dpo_sum, simnpo_sum, undial_sum
from engine.models.causal_lm import load_causal_lm, load_tokenizer, token_logits
from tests.conftest import TOFU


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose logits are given per (row, position)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(logits=self.logits)


def log_softmax(xs: list[float]) -> list[float]:
    z = math.log(sum(math.exp(x) for x in xs))
    return [x - z for x in xs]


def nll(logits: torch.Tensor, pos: tuple[int, int], y: int) -> float:
    return -log_softmax(logits[pos].tolist())[y]


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def blocks(examples: list[dict], forget: int, idk: int) -> dict:
    """A paired batch by hand: ``forget`` forget rows first, ``idk`` idk rows last, retain rows between."""
    batch = collate(examples, pad_id=0)
    n = len(examples)
    batch["is_forget"] = torch.arange(n) < forget
    batch["is_idk"] = torch.arange(n) >= n - idk
    batch["forget_token"] = batch["is_forget"][batch["sequence"]]
    batch["idk_token"] = batch["is_idk"][batch["sequence"]]
    return batch


FORGET = {"input_ids": [1, 2, 3, 4], "labels": [IGNORE, 2, 3, 4]}  # targets 2, 3, 4 at positions 0, 1, 2
RETAIN = {"input_ids": [1, 4], "labels": [IGNORE, 4]}  # target 4 at position 0
IDK = {"input_ids": [1, 5, 6], "labels": [IGNORE, 5, 6]}  # targets 5, 6 at positions 0, 1


def case(examples, forget: int, idk: int, seed: int = 3):
    batch = blocks(examples, forget, idk)
    g = torch.Generator().manual_seed(seed)
    shape = (len(examples), batch["input_ids"].shape[1], 7)
    return batch, torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def test_simnpo_loss_by_hand_and_its_length_normalisation():
    batch, s, _ = case([FORGET, RETAIN], forget=1, idk=0)
    sl, y = token_logits(FixedLogits(s), batch), batch["labels"]
    f = sum(nll(s, (0, p), t) for p, t in ((0, 2), (1, 3), (2, 4)))  # the forget answer's summed NLL, |y| = 3
    r = nll(s, (1, 0), 4)
    beta, delta, gamma, alpha = 2.5, 0.4, 0.3, 1.7
    by_hand = gamma * -2 / beta * log_sigmoid(beta * (f / 3 - delta)) + alpha * r
    method = SimNpo(SimNpoConfig(beta=beta, delta=delta, gamma=gamma, alpha=alpha))
    assert method.part_counts("paired", batch) == (1, 1)  # forget sequences, retain tokens
    terms = method.loss("paired", sl, None, y, batch=batch)
    assert float(terms.mean((1, 1)).detach()) == pytest.approx(by_hand, rel=1e-6)
    # the paper's form: -(2/beta) log sigmoid(-(beta/|y|) log pi - gamma') with gamma' = beta * delta
    log_pi = -f
    paper = -2 / beta * log_sigmoid(-(beta / 3) * log_pi - beta * delta)
    assert float(simnpo_sum(torch.tensor([f]), torch.tensor([3]), beta, delta)) == pytest.approx(
        paper, rel=1e-6
    )
    # length-normalised: an answer twice as long with the same NLL per token costs the same (NPO's would not)
    one = simnpo_sum(torch.tensor([1.2]), torch.tensor([2]), beta, delta)
    two = simnpo_sum(torch.tensor([2.4]), torch.tensor([4]), beta, delta)
    assert float(one) == pytest.approx(float(two), rel=1e-7)
    assert float(simnpo_sum(torch.tensor([1.2]), torch.tensor([4]), beta, delta)) > float(
        one
    )  # less NLL/token


def test_simnpo_descends_by_lowering_the_forget_answer_and_raising_the_retain_answer():
    batch, s, _ = case([FORGET, RETAIN], forget=1, idk=0)
    model = FixedLogits(s)
    terms = SimNpo(SimNpoConfig()).loss(
        "paired", token_logits(model, batch), None, batch["labels"], batch=batch
    )
    (grad,) = torch.autograd.grad(terms.mean((1, 1)), model.logits)
    # a gradient step (minus the gradient) lowers each forget label's logit and raises the retain label's
    assert all(float(grad[0, p, t]) > 0 for p, t in ((0, 2), (1, 3), (2, 4)))
    assert float(grad[1, 0, 4]) < 0


def test_undial_target_is_the_teacher_with_the_label_logit_lowered_by_beta():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 6, generator=g, requires_grad=True), torch.randn(3, 6, generator=g)
    y, beta = torch.tensor([1, 4, 0]), 3.0
    by_hand, targets = 0.0, []
    for i in range(3):
        adjusted = [v - (beta if j == int(y[i]) else 0.0) for j, v in enumerate(t[i].tolist())]
        p = [math.exp(v) for v in log_softmax(adjusted)]
        targets.append(p)
        by_hand += -sum(pj * qj for pj, qj in zip(p, log_softmax(s[i].tolist())))
        # the label's share falls from p_y to p_y e^-beta / (1 - p_y + p_y e^-beta); the rest scale up alike
        p_y = math.exp(log_softmax(t[i].tolist())[int(y[i])])
        assert p[int(y[i])] == pytest.approx(
            p_y * math.exp(-beta) / (1 - p_y + p_y * math.exp(-beta)), rel=1e-6
        )
    loss = undial_sum(s, t, y, beta)
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-6)
    # its gradient is softmax(s) - target: the student is pulled to exactly that distribution
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(
        grad, torch.softmax(s.detach(), -1) - torch.tensor(targets), rtol=1e-5, atol=1e-6
    )
    # started at the teacher (student == teacher), a step lowers every label's logit
    start = t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(undial_sum(start, t, y, beta), start)
    assert all(float(grad[i, int(y[i])]) > 0 for i in range(3))


def test_undial_method_on_paired_and_forget_only_batches():
    batch, s, t = case([FORGET, RETAIN], forget=1, idk=0)
    sl, tl, y = token_logits(FixedLogits(s), batch), token_logits(FixedLogits(t), batch), batch["labels"]
    f = batch["forget_token"]
    beta = 2.0
    forget_sum = float(undial_sum(sl[f], tl[f], y[f], beta).detach())
    paired = Undial(UndialConfig(beta=beta, gamma=0.5, alpha=2.0))
    assert [p.stream for p in paired.phases(1)] == ["paired"]
    assert paired.part_counts("paired", batch) == (3, 1)  # forget tokens, retain tokens
    terms = paired.loss("paired", sl, tl, y, batch=batch)
    expected = 0.5 * forget_sum / 3 + 2.0 * nll(s, (1, 0), 4)
    assert float(terms.mean((3, 1)).detach()) == pytest.approx(expected, rel=1e-6)
    # alpha = 0 (the default): the forget stream alone, every counted token a forget token
    alone = Undial(UndialConfig(beta=beta))
    assert [p.stream for p in alone.phases(1)] == ["forget"]
    fb = collate([FORGET], pad_id=0)
    fs, ft = token_logits(FixedLogits(s[:1]), fb), token_logits(FixedLogits(t[:1]), fb)
    assert alone.part_counts("forget", fb) == (3, 0)
    terms = alone.loss("forget", fs, ft, fb["labels"], batch=fb)
    assert float(terms.mean((3, 0)).detach()) == pytest.approx(forget_sum / 3, rel=1e-6)


def test_idk_nll_learns_the_idk_answers_and_keeps_the_retain_answers():
    batch, s, _ = case([RETAIN, IDK], forget=0, idk=1)  # IdkNLL's batch: no forget answer in it
    sl, y = token_logits(FixedLogits(s), batch), batch["labels"]
    method = IdkNll(IdkNllConfig(gamma=0.7, alpha=1.3))
    assert method.part_counts("paired", batch) == (2, 1)  # idk tokens, retain tokens
    terms = method.loss("paired", sl, None, y, batch=batch)
    idk = (nll(s, (1, 0), 5) + nll(s, (1, 1), 6)) / 2
    assert float(terms.mean((2, 1)).detach()) == pytest.approx(0.7 * idk + 1.3 * nll(s, (0, 0), 4), rel=1e-6)
    model = FixedLogits(s)
    (grad,) = torch.autograd.grad(method.loss("paired", token_logits(model, batch), None, y, batch).mean((2, 1)),
                                  model.logits)  # fmt: skip
    assert float(grad[1, 0, 5]) < 0 and float(grad[1, 1, 6]) < 0  # a step raises the idk answer's tokens


def test_idk_dpo_loss_by_hand_and_at_the_reference():
    batch, s, t = case([FORGET, RETAIN, IDK], forget=1, idk=1)
    sl, tl, y = token_logits(FixedLogits(s), batch), token_logits(FixedLogits(t), batch), batch["labels"]

    def answer(logits, row, targets):
        return sum(nll(logits, (row, p), v) for p, v in enumerate(targets))

    lose, lose_ref = answer(s, 0, [2, 3, 4]), answer(t, 0, [2, 3, 4])
    win, win_ref = answer(s, 2, [5, 6]), answer(t, 2, [5, 6])
    beta, gamma, alpha = 0.5, 0.8, 1.5
    margin = (win_ref - win) - (lose_ref - lose)  # log pi/pi_ref of the idk answer minus the forget answer's
    by_hand = gamma * -2 / beta * log_sigmoid(beta * margin) + alpha * nll(s, (1, 0), 4)
    method = IdkDpo(IdkDpoConfig(beta=beta, gamma=gamma, alpha=alpha))
    assert method.part_counts("paired", batch) == (1, 1)  # preference pairs, retain tokens
    terms = method.loss("paired", sl, tl, y, batch=batch)
    assert float(terms.mean((1, 1)).detach()) == pytest.approx(by_hand, rel=1e-6)
    # at the reference (student == original) every pair costs -2/beta * log sigmoid(0) = 2/beta * log 2
    at_ref = IdkDpo(IdkDpoConfig(beta=beta, alpha=0.0)).loss("paired", sl, sl.detach(), y, batch=batch)
    assert float(at_ref.mean((1, 1)).detach()) == pytest.approx(-2 / beta * math.log(0.5), rel=1e-6)
    z = torch.zeros(2)
    assert float(dpo_sum(z, z, z, z, beta)) == pytest.approx(2 * 2 / beta * math.log(2), rel=1e-6)
    # from the reference, a step raises the idk answer and lowers the forget answer
    model = FixedLogits(s)
    loss = method.loss("paired", token_logits(model, batch), sl.detach(), y, batch=batch).mean((1, 1))
    (grad,) = torch.autograd.grad(loss, model.logits)
    assert all(float(grad[0, p, v]) > 0 for p, v in ((0, 2), (1, 3), (2, 4)))
    assert all(float(grad[2, p, v]) < 0 for p, v in ((0, 5), (1, 6)))


def test_tofu_idk_answers_are_read_beside_the_splits():
    answers = load_idk_answers(str(TOFU))
    lines = [x.strip() for x in (TOFU / "idontknow.jsonl").read_text().splitlines() if x.strip()]
    assert answers == lines and len(answers) > 50 and all(a and not a.startswith('"') for a in answers)


@pytest.fixture(scope="module")
def qa(tiny_lm):
    tok = load_tokenizer(str(tiny_lm))
    fmt = QAFormatter(tok, max_length=64)
    rows = [{"question": f"Question {i}?", "answer": f"Answer number {i}.", "id": 100 + i} for i in range(24)]
    return tok, fmt, rows


def idk_stream(qa, with_forget: bool, seed: int = 7) -> PairedStream:
    tok, fmt, rows = qa
    forget, retain = TextStream(rows[:6], fmt, tok.pad_token_id), TextStream(rows[6:], fmt, tok.pad_token_id)
    forget.idk = IdkAnswers(
        rows[:6], ["I don't know.", "No idea at all.", "Cannot say."], fmt, seed, with_forget
    )
    return PairedStream(forget, retain)


def test_the_paired_batch_carries_each_forget_rows_idk_answer(qa):
    tok, fmt, rows = qa
    paired = idk_stream(qa, with_forget=True)
    idk = paired.forget.idk
    batch = paired.get(torch.tensor([4, 1, 2]), seed=5)
    assert batch["is_forget"].tolist() == [True] * 3 + [False] * 6
    assert batch["is_idk"].tolist() == [False] * 6 + [True] * 3
    for k, i in enumerate([4, 1, 2]):  # the idk block: the same questions as the forget block, in its order
        expected = fmt.encode(rows[i]["question"], idk.answer(i))["input_ids"]
        assert batch["input_ids"][6 + k, : len(expected)].tolist() == expected
        assert idk.answer(i) == idk.answers[idk_choice(rows[i]["id"], 7, 3)]
    assert batch["idk_token"].sum() == sum(
        len([x for x in idk.example(i)["labels"] if x != IGNORE]) for i in [4, 1, 2]
    )
    # the choice is fixed by (seed, row id): not by the step's draw seed nor by how a batch is split
    ids = idk.example(4)["input_ids"]
    assert paired.get(torch.tensor([4]), seed=99)["input_ids"][2, : len(ids)].tolist() == ids
    assert len({idk.answer(i) for i in range(6)}) > 1  # rows do not all get the same answer
    # IdkNLL's batch: no forget answers, the retain partners then the idk answers
    lean = idk_stream(qa, with_forget=False).get(torch.tensor([4, 1, 2]), seed=5)
    assert not lean["is_forget"].any() and lean["is_idk"].tolist() == [False] * 3 + [True] * 3
    assert lean["partner_rows"].tolist() == batch["partner_rows"].tolist()


@pytest.mark.parametrize("name", ["simnpo", "undial", "idk_nll", "idk_dpo"])
def test_two_micro_batches_give_the_loss_of_the_whole_batch(qa, tiny_lm, name):
    """The loop's normalisation (engine/loop.py): each part over its count in the whole global batch, so halves of
    a batch on 2 ranks or micro-batches sum to the one-process loss (what part_counts must get right)."""
    from engine.methods import METHODS

    config, cls = METHODS[name]
    method = cls(config(alpha=0.6) if name == "undial" else config())
    paired = idk_stream(qa, with_forget=getattr(cls, "idk_with_forget", True))
    student, teacher = load_causal_lm(str(tiny_lm)), load_causal_lm(str(tiny_lm))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def terms(batch):
        with torch.no_grad():
            return method.loss("paired", token_logits(student, batch), token_logits(teacher, batch), batch["labels"],
                               batch=batch)  # fmt: skip

    rows = torch.tensor([0, 3, 5, 2])
    halves = [paired.get(rows[:2], seed=1), paired.get(rows[2:], seed=1)]
    totals = tuple(a + b for a, b in zip(*(method.part_counts("paired", h) for h in halves)))
    whole = paired.get(rows, seed=1)
    assert method.part_counts("paired", whole) == totals
    summed = sum(float(terms(h).mean(totals)) for h in halves)
    assert summed == pytest.approx(float(terms(whole).mean(totals)), rel=1e-5)


@pytest.mark.parametrize("name", ["simnpo", "undial", "idk_nll", "idk_dpo"])
def test_each_method_validates_on_tofu_with_its_sources_defaults(name):
    from engine.config.loading import load_config
    from engine.config.rules import check

    cfg = load_config("configs/tofu.yaml", [f"method={name}"], command="run")
    check(cfg, "run")
    m = cfg.method
    expected = {  # open-unlearning's configs/trainer/*.yaml (docs/language-models.md)
        "simnpo": {"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0, "lr": 1e-5},
        "undial": {"beta": 10.0, "gamma": 1.0, "alpha": 0.0, "lr": 1e-4},
        "idk_nll": {"gamma": 1.0, "alpha": 1.0, "lr": 1e-5},
        "idk_dpo": {"beta": 0.1, "gamma": 1.0, "alpha": 1.0, "lr": 1e-5},
    }[name]
    assert {k: getattr(m, k) for k in expected} == expected
    assert (m.optimizer, m.weight_decay, m.epochs) == ("adamw", 0.01, 10)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["method=idk_nll"], "needs prompt/answer pairs"),  # configs/text.yaml: raw documents
        (["method=idk_dpo", "data.text_column=null", "data.prompt_column=q", "data.answer_column=a"],
         "set method.idk_file=FILE"),
        (["method=idk_dpo", "data.text_column=null", "data.prompt_column=q", "data.answer_column=a",
          "method.idk_file=no-such-file.txt"], "is not a file"),
        (["method=idk_nll", "task=image_classification", "data.text_column=null"],
         "needs an \"I don't know\" answer to each forget question"),
    ],
)  # fmt: skip
def test_idk_methods_are_refused_where_no_idk_answer_can_be_served(overrides, named):
    from engine.config.loading import load_config
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match=named):
        load_config("configs/text.yaml", overrides, command="run")


def test_idk_methods_are_refused_on_ray_whose_workers_read_token_stores_only():
    from engine.config.loading import load_config
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="backend.name=ray"):
        load_config("configs/tofu.yaml", ["method=idk_dpo", "backend.name=ray"], command="run")


def test_a_local_idk_file_serves_other_question_answer_data(tmp_path):
    from engine.config.loading import load_config
    from engine.data.tofu import read_answer_lines

    file = tmp_path / "idk.txt"
    file.write_text("Not known.\n\n  No idea.  \n")
    over = ["method=idk_nll", "data.text_column=null", "data.prompt_column=q", "data.answer_column=a",
            f"method.idk_file={file}"]  # fmt: skip
    assert load_config("configs/text.yaml", over, command="run").method.idk_file == str(file)
    assert read_answer_lines(file) == ["Not known.", "No idea."]
