"""The teacher's outputs computed once (engine/teacher_cache.py): the top-k divergence by hand, lookups equal to
teacher forwards whatever the batch, and a cached SCRUB run equal to an uncached one.

Stated tolerance: the full cached distribution is the teacher's own forward on other batch compositions, so
it equals it up to float reassociation (atol 1e-6 on probabilities); a whole cached run's weights equal the
uncached run's to atol 1e-5."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.backends.base import Backend
from engine.methods.losses import TopKLogits, distill_kl_sum
from engine.teacher_cache import fill_teacher_cache
from engine.testing import tofu_overrides


class OneProcess(Backend):
    """The base backend's one process (rank 0 of 1, no autocast) with the gather a real backend has."""

    def gather_object(self, obj):
        return [obj]


def _topk(logits: torch.Tensor, k: int, t: float) -> TopKLogits:
    values, indices = logits.topk(k, dim=1)
    return TopKLogits(values, indices, torch.logsumexp(logits / t, dim=1), t)


def test_topk_over_the_whole_vocabulary_is_the_exact_divergence():
    torch.manual_seed(0)
    s = torch.randn(7, 11, requires_grad=True)
    t = torch.randn(7, 11)
    full = distill_kl_sum(s, t, 4.0)
    (g_full,) = torch.autograd.grad(full, s)
    cached = distill_kl_sum(s, _topk(t, 11, 4.0), 4.0)
    (g_cached,) = torch.autograd.grad(cached, s)
    torch.testing.assert_close(cached, full)
    torch.testing.assert_close(g_cached, g_full)


def test_cached_probabilities_give_the_divergence_and_its_gradient():
    from engine.methods.losses import TeacherProbs

    torch.manual_seed(3)
    s, t = torch.randn(6, 13, requires_grad=True), torch.randn(6, 13)
    log_p = torch.log_softmax(t / 2.0, 1)
    cached = TeacherProbs(log_p.exp(), (log_p.exp() * log_p).sum(1), 2.0)
    full = distill_kl_sum(s, t, 2.0, chunk_rows=4)
    (g_full,) = torch.autograd.grad(full, s)
    got = distill_kl_sum(s, cached, 2.0, chunk_rows=4)  # chunked: the rows of the cache slice with the logits
    (g_got,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("phase", ["min", "max"])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_scrub_loss_on_cached_probabilities_at_t1_equals_the_loss_on_logits(phase, chunk_rows):
    """At T = 1 SCRUB fuses the divergence and the cross-entropy into one soft-target cross-entropy: the same
    loss and gradient as the two terms computed from the teacher's logits."""
    from engine.methods.losses import TeacherProbs
    from engine.methods.scrub import Scrub, ScrubConfig

    torch.manual_seed(4)
    scrub = Scrub(ScrubConfig(temperature=1.0, gamma=0.7, alpha=0.3, forget_nll=0.2, chunk_rows=chunk_rows))
    s, t, y = torch.randn(8, 17, requires_grad=True), torch.randn(8, 17), torch.randint(0, 17, (8,))
    log_p = torch.log_softmax(t, 1)
    cached = TeacherProbs(log_p.exp(), (log_p.exp() * log_p).sum(1), 1.0)
    expected = scrub.loss(phase, s, t, y).total
    (g_expected,) = torch.autograd.grad(expected, s)
    got = scrub.loss(phase, s, cached, y).total
    (g_got,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-5, atol=1e-6)


def test_topk_divergence_by_hand_is_the_k_plus_one_bucket_kl():
    torch.manual_seed(1)
    s, t, temp, k = torch.randn(5, 9), torch.randn(5, 9), 2.0, 3
    p, q = torch.softmax(t / temp, 1), torch.softmax(s / temp, 1)
    expected = 0.0
    for i in range(5):
        top = t[i].argsort(descending=True)[:k].tolist()
        rest = [j for j in range(9) if j not in top]
        pb = [float(p[i, j]) for j in top] + [float(p[i, rest].sum())]
        qb = [float(q[i, j]) for j in top] + [float(q[i, rest].sum())]
        expected += sum(a * (torch.tensor(a).log() - torch.tensor(b).log()) for a, b in zip(pb, qb))
    cached = distill_kl_sum(s, _topk(t, k, temp), temp)
    torch.testing.assert_close(cached, torch.as_tensor(expected * temp * temp, dtype=torch.float32))
    assert cached <= distill_kl_sum(s, t, temp) + 1e-6  # a coarsening never increases a divergence
    tail = _topk(t, k, temp).tail_mass()
    torch.testing.assert_close(
        tail, torch.stack([p[i, t[i].argsort(descending=True)[k:]].sum() for i in range(5)])
    )


class Rows:
    """A classifier's stream: row r is a fixed random input."""

    def __init__(self, n: int):
        self.x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    def __len__(self) -> int:
        return len(self.x)

    def get(self, rows, seed=0):
        return {"inputs": self.x[rows], "labels": torch.zeros(len(rows), dtype=torch.long), "rows": rows}


def test_classifier_lookups_equal_teacher_forwards_on_any_batch():
    from engine.models.vision import PreActResNetConfig, PreActResNetForImageClassification

    torch.manual_seed(0)
    model = PreActResNetForImageClassification(PreActResNetConfig(num_labels=5, width=0.125))
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity: eval mode must use them
        model(torch.randn(16, 3, 8, 8))

    def forward(m, b):
        return m(b["inputs"]).logits

    stream = Rows(37)
    cache = fill_teacher_cache(model, {"retain": stream}, forward, OneProcess(), batch_size=8, temperature=4.0,
                               topk=64, budget_bytes=2**30, progress=False)  # fmt: skip
    assert model.training  # the pass left the student's mode as it found it
    assert cache.summary()["streams"]["retain"]["kind"] == "probs"
    rows = torch.tensor([30, 2, 2, 17, 36, 0])
    batch = stream.get(rows)
    with torch.no_grad():
        expected = forward(model.eval(), batch)
    got = cache.lookup("retain", batch)
    torch.testing.assert_close(got.probs, torch.softmax(expected / 4.0, 1), atol=1e-6, rtol=1e-5)
    student = torch.randn_like(expected)  # the divergence from the cache is the one from the teacher's logits
    torch.testing.assert_close(distill_kl_sum(student, got, 4.0), distill_kl_sum(student, expected, 4.0), rtol=1e-4,
                               atol=1e-5)  # fmt: skip


def test_causal_lm_lookups_full_and_topk(tiny_lm):
    from engine.data.text import QAFormatter, TextStream
    from engine.models.causal_lm import load_causal_lm, load_tokenizer, token_logits

    tok = load_tokenizer(str(tiny_lm))
    model = load_causal_lm(str(tiny_lm))
    rows = [{"question": f"Who wrote book {i}?", "answer": "Someone " * (1 + i % 5)} for i in range(13)]
    stream = TextStream(rows, QAFormatter(tok, 64, "off"), tok.pad_token_id)
    args = dict(batch_size=4, temperature=2.0, topk=5, progress=False)
    full = fill_teacher_cache(
        model, {"forget": stream}, token_logits, OneProcess(), budget_bytes=2**30, **args
    )
    top = fill_teacher_cache(model, {"forget": stream}, token_logits, OneProcess(), budget_bytes=0, **args)
    batch = stream.get(torch.tensor([12, 3, 7]))  # another padding width than the pass's batches
    with torch.no_grad():
        expected = token_logits(model.eval(), batch)
    torch.testing.assert_close(full.lookup("forget", batch).probs, torch.softmax(expected / 2.0, 1), atol=1e-6,
                               rtol=1e-5)  # fmt: skip
    cached = top.lookup("forget", batch)
    summary = top.summary()["streams"]["forget"]
    assert summary["kind"] == "topk" and 0 < summary["tail_mass_mean"] < 1
    torch.testing.assert_close(cached.values, expected.topk(5, dim=1).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.lse, torch.logsumexp(expected / 2.0, dim=1), atol=1e-5, rtol=1e-5)


def _weights(out):
    return load_file(out / "model" / "model.safetensors")


def test_cached_scrub_run_equals_the_uncached_run(tiny_lm, tmp_path):
    """SCRUB on TOFU (max and min steps): the student never loads a teacher, and lands where the run with a
    teacher forward every step does."""
    from engine.cli import main

    outs = {}
    for mode in ("off", "auto"):
        out = tmp_path / mode
        args = tofu_overrides(tiny_lm, tmp_path, output_dir=out, **{"eval.reference": "null",
                              "method.teacher_cache": mode, "method.lr": "0.003", "method.forget_batch_size": "3",
                              "method.epochs": "2", "method.msteps": "1", "method.forget_nll": "0.1"})  # fmt: skip
        assert main(["run", "configs/tofu.yaml", *args]) == 0
        outs[mode] = out
    cached = json.loads((outs["auto"] / "report.json").read_text())
    plain = json.loads((outs["off"] / "report.json").read_text())
    assert cached["teacher_cache"]["streams"]["retain"]["kind"] == "probs"
    assert set(cached["teacher_cache"]["streams"]) == {"forget", "retain"}
    assert plain["teacher_cache"] is None and cached["teacher"] is None  # no teacher model in the cached run
    a, b = _weights(outs["auto"]), _weights(outs["off"])
    moved = max(float((a[k] - load_file(tiny_lm / "model.safetensors")[k]).abs().max()) for k in a)
    assert moved > 1e-3  # the run really trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    for phase in plain["losses"]:
        torch.testing.assert_close(torch.tensor(cached["losses"][phase]), torch.tensor(plain["losses"][phase]),
                                   atol=1e-5, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize(
    "settings, said",
    [
        ({"augment": True}, "augment"),
        ({"param_distance": 0.5}, "param_distance"),
        ({"teacher_cache": "off"}, None),
    ],
)
def test_auto_turns_itself_off_with_a_reason(settings, said):
    from engine.methods.scrub import Scrub, ScrubConfig
    from engine.teacher_cache import teacher_cache_wanted

    lines = []
    config = ScrubConfig(**settings)
    assert not teacher_cache_wanted(Scrub(config), lines.append)
    assert (said is None and not lines) or (said in lines[0] and "teacher_cache: off" in lines[0])
    assert teacher_cache_wanted(Scrub(ScrubConfig()), lines.append)
