"""Token-level SCRUB and the language-model baselines against values computed by hand."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from engine.data.paired import PairedStream
from engine.data.text import IGNORE, QAFormatter, TextStream, collate
from engine.data.tofu import prepare_tofu
from engine.loop import run_loop
from engine.methods import (
    GradAscent,
    GradAscentConfig,
    GradDiff,
    GradDiffConfig,
    Npo,
    NpoConfig,
    Scrub,
    ScrubConfig,
)
from engine.models.causal_lm import load_causal_lm, load_tokenizer, token_logits
from engine.testing import build_tiny_llama
from tests.conftest import TOFU


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose logits are given per (row, position), to test masking by hand."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(logits=self.logits)


def kl(p_logits: list[float], q_logits: list[float], t: float) -> float:
    """KL(softmax(p/t) || softmax(q/t)) with plain math."""
    zp = sum(math.exp(x / t) for x in p_logits)
    zq = sum(math.exp(x / t) for x in q_logits)
    p = [math.exp(x / t) / zp for x in p_logits]
    q = [math.exp(x / t) / zq for x in q_logits]
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_kl_masks_prompt_and_padding_and_shifts_labels(side):
    # Row 0: 4 tokens, prompt of 2 -> answer tokens at positions 2, 3 -> predicted from positions 1, 2.
    # Row 1: 3 tokens, prompt of 1 -> answer tokens at 1, 2 -> predicted from positions 0, 1. Padded to 4.
    examples = [
        {"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8]},
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
    ]
    batch = collate(examples, pad_id=0, padding_side=side)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 10, generator=g)
    t = torch.randn(2, 4, 10, generator=g)
    student, teacher = FixedLogits(s), FixedLogits(t)
    offset = 1 if side == "left" else 0  # row 1's tokens start at column 1 when padded on the left
    counted = [(0, 1, 7), (0, 2, 8), (1, 0 + offset, 6), (1, 1 + offset, 7)]  # (row, position, target)
    assert batch["labels"].tolist() == [c[2] for c in counted]
    assert batch["sequence"].tolist() == [0, 0, 1, 1]
    temp = 2.0
    by_hand = sum(kl(t[r, p].tolist(), s[r, p].tolist(), temp) for r, p, _ in counted) / 4 * temp**2
    scrub = Scrub(ScrubConfig(temperature=temp))
    terms = scrub.loss("max", token_logits(student, batch), token_logits(teacher, batch), batch["labels"])
    assert terms.count == 4
    assert float(-terms.total.detach() / terms.count) == pytest.approx(by_hand, rel=1e-6)
    # min-step: gamma * NLL of the shifted targets + alpha * the same divergence
    nll = sum(-torch.log_softmax(s[r, p], -1)[y].item() for r, p, y in counted) / 4
    terms = Scrub(ScrubConfig(temperature=temp, gamma=0.7, alpha=0.3)).loss(
        "min", token_logits(student, batch), token_logits(teacher, batch), batch["labels"]
    )
    assert float(terms.total.detach() / terms.count) == pytest.approx(0.7 * nll + 0.3 * by_hand, rel=1e-6)


def test_left_and_right_padding_give_the_same_token_logits(tiny_lm):
    model = load_causal_lm(str(tiny_lm))
    tok = load_tokenizer(str(tiny_lm))
    fmt = QAFormatter(tok, max_length=64)
    examples = [fmt.encode("Who wrote it?", "A long answer about a book"), fmt.encode("Where?", "Paris")]
    right = token_logits(model, collate(examples, tok.pad_token_id, "right"))
    left = token_logits(model, collate(examples, tok.pad_token_id, "left"))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)


def test_chunked_divergence_equals_unchunked_in_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(37, 50, generator=g, requires_grad=True)
    t = torch.randn(37, 50, generator=g)
    from engine.methods.losses import distill_kl_sum

    full = distill_kl_sum(s, t, 4.0)
    (grad_full,) = torch.autograd.grad(full, s)
    chunked = distill_kl_sum(s, t, 4.0, chunk_rows=8)
    (grad_chunked,) = torch.autograd.grad(chunked, s)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_chunked, grad_full, rtol=1e-6, atol=1e-7)


def _paired_case():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]},  # forget row: targets 2, 3
        {"input_ids": [1, 4], "labels": [IGNORE, 4]},  # retain row: target 4
    ]
    batch = collate(examples, pad_id=0)
    is_forget = torch.tensor([True, False])
    batch["is_forget"], batch["forget_token"] = is_forget, is_forget[batch["sequence"]]
    g = torch.Generator().manual_seed(2)
    return batch, torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)


def _nll(logits, pos, y):
    return -torch.log_softmax(logits[pos], -1)[y].item()


def test_grad_ascent_grad_diff_and_npo_losses_by_hand():
    batch, s, t = _paired_case()
    sl, tl = token_logits(FixedLogits(s), batch), token_logits(FixedLogits(t), batch)
    y = batch["labels"]
    f = [_nll(s, (0, 0), 2), _nll(s, (0, 1), 3)]
    r = [_nll(s, (1, 0), 4)]
    ga = GradAscent(GradAscentConfig()).loss("forget", sl[:2], None, y[:2])
    assert float(ga.total.detach() / ga.count) == pytest.approx(-(f[0] + f[1]) / 2, rel=1e-6)
    graddiff = GradDiff(GradDiffConfig(gamma=0.5, alpha=2.0))
    gd = graddiff.loss("paired", sl, None, y, batch=batch)
    assert graddiff.part_counts("paired", batch) == (2, 1)  # forget tokens, retain tokens: two means
    assert float(gd.mean((2, 1)).detach()) == pytest.approx(-0.5 * (f[0] + f[1]) / 2 + 2.0 * r[0], rel=1e-6)
    # NPO: per forget SEQUENCE, log-ratio = log pi - log pi_ref over its whole answer
    beta = 0.3
    ref = [_nll(t, (0, 0), 2) + _nll(t, (0, 1), 3)]
    log_ratio = ref[0] - (f[0] + f[1])
    npo_forget = -2 / beta * math.log(1 / (1 + math.exp(beta * log_ratio)))  # log sigmoid(-beta x)
    method = Npo(NpoConfig(beta=beta, gamma=1.0, alpha=1.0))
    npo = method.loss("paired", sl, tl, y, batch=batch)
    assert method.part_counts("paired", batch) == (1, 1)  # forget sequences, retain tokens
    assert float(npo.mean((1, 1)).detach()) == pytest.approx(npo_forget + r[0], rel=1e-6)
    # at the start (student == reference) NPO's forget term is 2/beta * log 2, as its paper says
    at_start = Npo(NpoConfig(beta=beta, alpha=0.0)).loss("paired", sl, sl.detach(), y, batch=batch)
    assert float(at_start.mean((1, 1)).detach()) == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_tofu_slice_keeps_the_benchmark_structure():
    cfg = SimpleNamespace(dataset=str(TOFU), forget_split="forget10", num_authors=10, utility_examples=None)
    data = prepare_tofu(cfg)
    # the first author of forget10 (TOFU's last 20 authors), as documented in prepare_tofu
    assert [r["id"] for r in data.forget] == list(range(3600, 3620))
    assert [r["id"] for r in data.retain] == list(range(0, 180))  # the first 9 authors
    assert len(data.holdout) == 20 and len(data.forget_eval) == 20 and len(data.retain_eval) == 180
    assert {r["question"] for r in data.holdout}.isdisjoint(r["question"] for r in data.full)
    assert data.forget_summary()["size"] == 20


def test_scrub_forget_step_moves_the_student_and_never_the_teacher(tiny_lm):
    tok = load_tokenizer(str(tiny_lm))
    fmt = QAFormatter(tok, max_length=48)
    rows = [{"question": f"Question {i}?", "answer": f"Answer number {i}.", "id": i} for i in range(8)]
    forget = TextStream(rows[:4], fmt, tok.pad_token_id)
    retain = TextStream(rows[4:], fmt, tok.pad_token_id)
    student = load_causal_lm(str(tiny_lm))
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}

    from engine.backends.single import SingleProcessBackend

    backend = SingleProcessBackend("cpu")
    # msteps=1, epochs=1 but only the max phase matters here; forget_nll gives step 0 a gradient
    cfg = ScrubConfig(epochs=1, msteps=1, forget_batch_size=4, retain_batch_size=4, optimizer="adam", lr=1e-3,
                      weight_decay=0.0, forget_nll=1.0)  # fmt: skip
    student, teacher = backend.prepare(student, teacher, cfg.build_optimizer)
    streams = {"forget": forget, "retain": retain, "paired": PairedStream(forget, retain)}
    run_loop(Scrub(cfg), backend, student, teacher, streams, token_logits, seed=0, epochs=1, progress=False)
    assert any(not torch.equal(before_s[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(before_t[k], v) for k, v in teacher.state_dict().items())


def test_faithful_max_step_has_zero_gradient_at_the_teacher():
    """docs/algorithm.md's start-at-teacher problem: dropout 0 and student == teacher -> the divergence and its gradient are 0
    (up to float rounding: about a millionth of the forget NLL's gradient)."""
    model = build_tiny_llama(64, attention_dropout=0.0)
    teacher = copy.deepcopy(model).eval()
    batch = collate([{"input_ids": [1, 2, 3, 4], "labels": [IGNORE, 2, 3, 4]}], pad_id=0)
    model.train()
    with torch.no_grad():
        tl = token_logits(teacher, batch)
    terms = Scrub(ScrubConfig()).loss("max", token_logits(model, batch), tl, batch["labels"])
    assert abs(float(terms.total.detach())) < 1e-5

    def grad_norm(loss):
        grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
        return float(torch.sqrt(sum((g**2).sum() for g in grads if g is not None)))

    kl_norm = grad_norm(terms.total)
    nll_norm = grad_norm(torch.nn.functional.cross_entropy(token_logits(model, batch), batch["labels"]))
    assert kl_norm < 1e-5 * nll_norm


def test_paired_retain_partners_do_not_depend_on_how_a_batch_is_split(tiny_lm):
    """GradDiff/NPO draw a retain partner per forget row from (seed, row): two ranks holding halves of a
    global batch draw what one process draws for the whole batch, never the same draws as each other."""
    tok = load_tokenizer(str(tiny_lm))
    fmt = QAFormatter(tok, max_length=48)
    rows = [{"question": f"Question {i}?", "answer": f"Answer number {i}.", "id": i} for i in range(40)]
    paired = PairedStream(
        TextStream(rows[:8], fmt, tok.pad_token_id), TextStream(rows[8:], fmt, tok.pad_token_id)
    )

    def partners(idx):
        return paired.get(torch.tensor(idx), seed=5)["partner_rows"].tolist()

    whole = partners([0, 1, 2, 3, 4, 5])
    assert partners([0, 1, 2]) + partners([3, 4, 5]) == whole
    assert partners([0, 1, 2]) != partners([3, 4, 5])
