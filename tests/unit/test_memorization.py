"""open-unlearning's exact memorization and extraction strength (engine/eval/memorization.py): by hand on small
logits, then from score_encoded's one forward on a tiny Llama that half-memorised a few TOFU answers, against
the same numbers computed from the model's logits directly and extraction strength by greedy decoding."""

from __future__ import annotations

import json

import pytest
import torch

from engine.data.text import IGNORE, QAFormatter, TextData, collate
from engine.eval.memorization import EM, ES, from_hits, mean_of, memorization
from engine.eval.scoring import score_encoded
from engine.eval.text import evaluate_text
from engine.models.causal_lm import token_logits
from engine.testing import build_tiny_llama, build_tiny_tokenizer
from tests.conftest import TOFU

V = 7  # vocabulary of the hand-made logits


def _logits(predicted: list[int]) -> torch.Tensor:
    """[1, T, V] logits whose argmax at position t is ``predicted[t]``."""
    out = torch.randn(1, len(predicted), V)
    for t, p in enumerate(predicted):
        out[0, t, p] = out[0, t].max() + 1.0
    return out


def _one(predicted: list[int], labels: list[int]) -> dict:
    return memorization(_logits(predicted), torch.tensor([labels]))[0]


# ---- by hand -------------------------------------------------------------------------------------------


def test_every_token_right_is_full_memorization():
    assert _one([3, 1, 4, 1, 5], [3, 1, 4, 1, 5]) == {EM: 1.0, ES: 1.0}


def test_only_the_last_token_wrong_extracts_nothing():
    labels = [3, 1, 4, 1, 5]
    res = _one([3, 1, 4, 1, 6], labels)
    assert res[ES] == 0.0  # k = T: no non-empty suffix is reproduced (open-unlearning's loop would give 1/T)
    assert res[EM] == pytest.approx(4 / 5)


def test_the_first_token_wrong_but_the_rest_right():
    res = _one([0, 1, 4, 1, 5], [3, 1, 4, 1, 5])
    assert res[ES] == pytest.approx(1 - 1 / 5) and res[EM] == pytest.approx(4 / 5)


def test_the_last_miss_sets_k_however_many_precede_it():
    # misses at 0 and 2: the right suffix starts at k = 3 of T = 6, and 4 of 6 tokens are right
    res = _one([0, 2, 0, 4, 5, 6], [1, 2, 3, 4, 5, 6])
    assert res[ES] == pytest.approx(1 - 3 / 6) and res[EM] == pytest.approx(4 / 6)
    assert from_hits(torch.tensor([False, True, False, True, True, True])) == res


def test_ignored_labels_are_not_answer_tokens():
    # prompt and padding positions predict "wrong" tokens (nothing equals -100); only the 3 counted ones count
    predicted = [0, 0, 3, 1, 4, 0, 0]
    labels = [IGNORE, IGNORE, 3, 1, 4, IGNORE, IGNORE]
    assert _one(predicted, labels) == {EM: 1.0, ES: 1.0}
    res = _one([0, 0, 3, 2, 4, 0, 0], labels)
    assert res[EM] == pytest.approx(2 / 3) and res[ES] == pytest.approx(1 - 2 / 3)


def test_a_batch_of_rows_of_different_lengths_equals_each_row_alone():
    rows = [([3, 1, 4, 1, 5], [3, 1, 4, 1, 5]), ([0, 2, 0, 4], [1, 2, 3, 4]), ([6, 6], [5, 6]), ([2], [3])]
    width = max(len(p) for p, _ in rows)
    logits, labels = torch.randn(len(rows), width, V), torch.full((len(rows), width), IGNORE)
    for b, (predicted, answer) in enumerate(rows):
        logits[b, : len(predicted)] = _logits(predicted)[0]
        labels[b, : len(answer)] = torch.tensor(answer)
    assert memorization(logits, labels) == [_one(p, a) for p, a in rows]


def test_a_row_without_answer_tokens_has_no_score_and_means_skip_it():
    assert from_hits(torch.zeros(0, dtype=torch.bool)) == {EM: None, ES: None}
    assert mean_of([{EM: 0.5}, {EM: None}, {EM: 1.0}], EM) == pytest.approx(0.75)
    assert mean_of([{EM: None}], EM) is None
    with pytest.raises(ValueError, match="logits"):
        memorization(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


# ---- from the evaluator's forward, on a tiny Llama -----------------------------------------------------


@pytest.fixture(scope="module")
def half_memorised():
    """A tiny Llama trained for a few steps on 4 short TOFU answers (its state after 10, 20 and 30 steps, when
    its answers are partly right), its tokenizer and formatter, the rows and their encodings (different
    lengths)."""
    if not TOFU.exists():
        pytest.fail(f"TOFU not found at {TOFU}: the tests need ../shared/data beside the checkout")
    rows = [json.loads(line) for line in (TOFU / "forget10_perturbed.jsonl").read_text().splitlines()[:4]]
    tok = build_tiny_tokenizer([t for r in rows for t in (r["question"], r["answer"])])
    fmt = QAFormatter(tok, max_length=512, chat_template="off")
    rows = [{"id": f"f{i}", "question": r["question"], "answer": r["answer"].split(".")[0] + "."}
            for i, r in enumerate(rows)]  # fmt: skip
    encoded = [fmt.encode_row(r) for r in rows]
    model = build_tiny_llama(len(tok))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = collate(encoded, tok.pad_token_id)
    snapshots = []
    for step in range(31):
        if step in (10, 20, 30):  # partly memorised at these (0 and 40 steps: nothing, everything)
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        loss = torch.nn.functional.cross_entropy(token_logits(model, batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), fmt, rows, encoded, snapshots


def _greedy_es(model, encoded: dict) -> float:
    """Extraction strength the slow way: the smallest k such that greedy decoding from the prompt and the
    first k answer tokens reproduces the remaining T - k answer tokens."""
    ids, labels = encoded["input_ids"], encoded["labels"]
    answer = [t for t in range(1, len(ids)) if labels[t] != IGNORE]
    for k in range(len(answer)):
        context = list(ids[: answer[k]])
        for t in answer[k:]:
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([context])).logits[0, -1].argmax())
            if nxt != ids[t]:
                break
            context.append(nxt)
        else:
            return 1 - k / len(answer)
    return 0.0


def test_score_encoded_gives_both_from_its_forward_as_direct_logits_and_greedy_decoding_do(half_memorised):
    model, fmt, _, encoded, snapshots = half_memorised
    tok = fmt.tokenizer
    assert len({len(e["input_ids"]) for e in encoded}) == len(encoded)  # genuinely different padding
    partial = 0
    for state in snapshots:
        model.load_state_dict(state)
        batched = score_encoded(model, tok, encoded, batch_size=4)
        for row, enc in zip(batched, encoded, strict=True):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[:, :-1]
            direct = memorization(logits, torch.tensor([enc["labels"][1:]]))[0]
            assert {EM: row[EM], ES: row[ES]} == direct
            assert row[ES] == pytest.approx(_greedy_es(model, enc))  # one forward = greedy continuation
            assert row[ES] <= row[EM]  # a right suffix of length T - k: at least that share is right
            partial += 0 < row[ES] < 1
        alone = [score_encoded(model, tok, [e], batch_size=1)[0] for e in encoded]
        assert [(r[EM], r[ES]) for r in batched] == [(r[EM], r[ES]) for r in alone]
    assert partial >= 2  # the comparison saw answers extracted from the middle, not only all or nothing


def test_the_text_suite_reports_the_forget_rows_mean_and_values_by_id(half_memorised):
    model, fmt, rows, encoded, snapshots = half_memorised
    model.load_state_dict(snapshots[1])
    data = TextData(
        forget=rows[:3], retain=rows[3:], holdout=[], kind="ids", description="test", documents=False
    )
    res = evaluate_text(model, fmt, data, batch_size=2, max_new_tokens=2)
    scored = score_encoded(model, fmt.tokenizer, encoded[:3], batch_size=2)
    for key in (EM, ES):
        assert res["per_example"][f"{key}_by_id"] == {r["id"]: s[key] for r, s in zip(rows, scored)}
        assert res[key] == pytest.approx(sum(s[key] for s in scored) / 3)
    assert res[EM] > 0  # half-memorised: the means are not trivially 0
