"""The metric registry (engine/eval/registry.py): every metric a suite's evaluator produces on a tiny run is
registered, every registered metric of the suite is produced, and the report's tables, the tasks' headlines and
log lines are read from it."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from engine.eval import registry
from engine.eval import tofu as T
from engine.eval.registry import HIGHER, IMAGE, LOWER, METRICS, REFERENCE, TEXT, TOFU
from engine.eval.report import LAYOUTS, write_report
from engine.eval.text import evaluate_text
from engine.tasks.causal_lm import CausalLM
from engine.tasks.image_classification import ImageClassification
from tests.unit.test_eval_share import _image_set, image_task, tiny  # noqa: F401  (the tiny-run fixtures)


def test_every_metric_is_declared_consistently():
    for m in METRICS.values():
        assert m.suites and set(m.suites) <= set(LAYOUTS), m.key
        assert m.better in (HIGHER, LOWER, REFERENCE), m.key
        assert set(m.headline) <= set(m.suites), m.key
        assert set(m.depends) <= set(METRICS), m.key
        assert all(suite in m.suites and key in METRICS for suite, key in m.after), m.key
        format(1.5, m.fmt)
    for suite in LAYOUTS:
        labels = [m.label for m in registry.rows(suite)]
        assert len(labels) == len(set(labels)), suite
        assert registry.headline(suite), f"{suite} has no headline metric"


def _keys(metrics: dict) -> set[str]:
    return set(metrics) - {"per_example"}


def test_the_image_evaluator_produces_exactly_the_registered_metrics(image_task):  # noqa: F811
    task, model = image_task
    assert set(task.evaluate(copy.deepcopy(model), "cpu")) == registry.produced(IMAGE)
    # a request stream's later version also scores every example forgotten so far: the `when` metrics
    streamed = copy.copy(task)
    streamed.data = dataclasses.replace(task.data, forgotten=_image_set([0] * 6 + [1] * 4, 7, "g"))
    every = {m.key for m in registry.of_suite(IMAGE) if not m.reference_gap}
    assert set(streamed.evaluate(copy.deepcopy(model), "cpu")) == every
    assert every - registry.produced(IMAGE) == {m.key for m in METRICS.values() if m.when}


def test_the_tofu_evaluator_produces_exactly_the_registered_metrics(tiny):  # noqa: F811
    model, tok, fmt, data, _ = tiny
    res = T.evaluate_tofu(copy.deepcopy(model), tok, fmt, data, batch_size=4, max_new_tokens=2)
    assert _keys(res) == registry.produced(TOFU)
    assert res["model_utility"] == pytest.approx(T.hmean([res[k] for k in METRICS["model_utility"].depends]))


def test_the_text_evaluator_produces_exactly_the_registered_metrics(tiny):  # noqa: F811
    model, _, fmt, _, data = tiny
    res = evaluate_text(copy.deepcopy(model), fmt, data, batch_size=4, max_new_tokens=2, max_rows=4)
    assert _keys(res) == registry.produced(TEXT)
    # without holdout rows the attacks are None, the keys all there
    alone = evaluate_text(model, fmt, dataclasses.replace(data, holdout=[]), batch_size=4, max_new_tokens=2,
                          max_rows=4)  # fmt: skip
    assert _keys(alone) == registry.produced(TEXT) and alone["privleak"] is None


@pytest.mark.parametrize("suite", [IMAGE, TOFU, TEXT])
def test_the_report_table_is_the_registry_s_rows(tmp_path, suite):
    values = {m.key: 1.0 for m in registry.of_suite(suite)}
    write_report(tmp_path, {"suite": suite, "metrics": values, "reference": values, "method": {"name": "M"}})
    md = (tmp_path / "report.md").read_text().splitlines()
    table = md[md.index("## Metrics") + 4 :]
    labels = [line.split(" | ")[0].removeprefix("| ") for line in table[: table.index("")]]
    assert labels == [m.label for m in registry.rows(suite)]
    # without a reference, no gap to it
    write_report(tmp_path, {"suite": suite, "metrics": values, "method": {"name": "M"}})
    md = (tmp_path / "report.md").read_text()
    assert all((m.label in md) != m.reference_gap for m in registry.rows(suite))


def test_the_tasks_headlines_and_log_lines_come_from_the_registry():
    assert ImageClassification.headline == registry.headline(IMAGE)
    assert ImageClassification.headline[-1] == "forgotten_error"  # a headline that is no row of the table
    metrics = {"forget_error": 12.345, "mia": 50.0, "forget_val_error": 3.0}
    assert ImageClassification.describe(metrics) == "forget_error=12.35  mia=50.00"
    assert registry.headline(TOFU)[0] == "forget_quality" and "mia_min_k" in registry.headline(TEXT)
    # a language model's log line shows both suites' headlines: a history row has the NLLs, not TOFU's numbers
    row = {"epoch": 1, "forget_nll": 2.34567, "privleak": None, "forget_quality": 0.5}
    assert CausalLM.describe(row) == "forget_quality=0.5  forget_nll=2.346"
    assert registry.headline(TEXT) == ("forget_nll", "holdout_nll", "retain_nll", "forget_verbatim_rouge",
                                       "mia_min_k", "privleak")  # fmt: skip
