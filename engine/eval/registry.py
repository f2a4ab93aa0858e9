"""Every metric of every evaluation suite, declared once, as open-unlearning's metric registry does
(``src/evals/metrics/__init__.py``: a metric registered with what it depends on).

A metric has its key (in the suite evaluator's result and report.json), the suites whose evaluator produces it,
its label (its row in report.md's metrics table), which way is better (``reference``: closer to the reference
model's, Retrain's, which is how most unlearning numbers read), its number format, whether model cards and log
lines show it (``headline``, per suite) and the metrics it is computed from. The report's tables
(engine/eval/report.py), the tasks' headlines, log lines and model-card metrics are read from here, and the
evaluators read here what they aggregate (model utility's nine parts). Adding a metric is one line below, plus
its computation in the suite's evaluator (engine/eval/metrics.py, tofu.py or text.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

IMAGE, TOFU, TEXT = "image_classification", "tofu", "text"
MUSE = "muse"  # the MUSE preset's suite (engine/eval/muse.py); it shares the attacks and privleak with TOFU and text
HIGHER, LOWER, REFERENCE = "higher", "lower", "reference"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str  # HIGHER, LOWER or REFERENCE (closer to the reference model's)
    fmt: str  # format spec of its value
    suites: tuple[str, ...]  # whose evaluator produces it
    row: bool = True  # a row of its suites' metrics table in report.md (False: report.json only)
    headline: tuple[str, ...] = ()  # the suites whose model cards and log lines show it
    depends: tuple[str, ...] = ()  # the metrics it is computed from
    when: str = ""  # produced only when this holds ("": always)
    after: tuple[tuple[str, str], ...] = ()  # (suite, key): its row follows that key's there, not in order
    reference_gap: bool = False  # computed by the report: mean |value - the reference's| over ``depends``


# model utility's pre_compute list (open-unlearning's configs/eval/tofu_metrics/model_utility.yaml)
_UTILITY = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE",
            "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")  # fmt: skip
_STREAM = "a request stream forgot earlier examples (forget.earlier_ids)"
_I, _TT = (IMAGE,), (TOFU, TEXT, MUSE)
_M = Metric

# Registration order is each suite's row and headline order (errors and attacks in percent).
# fmt: off
METRICS: dict[str, Metric] = {m.key: m for m in (
    _M("forget_error", "Forget error (%)", REFERENCE, ".2f", _I, headline=_I),
    _M("retain_error", "Retain error (%)", LOWER, ".2f", _I, headline=_I),
    _M("test_error", "Test error (%)", LOWER, ".2f", _I, headline=_I),
    _M("val_error", "Val error (%)", LOWER, ".2f", _I, headline=_I),
    _M("mia", "Basic MIA (%)", REFERENCE, ".2f", _I, headline=_I),
    _M("mia_efficacy", "MIA-efficacy (%)", REFERENCE, ".2f", _I, headline=_I),
    # SalUn's summary: mean |value - Retrain| over UA, RA, TA and MIA-efficacy (gaps in accuracy equal gaps in error)
    _M("avg_gap", "Avg. gap to Retrain (SalUn)", LOWER, ".2f", _I, reference_gap=True,
       depends=("forget_error", "retain_error", "test_error", "mia_efficacy")),
    _M("forgotten_error", "Error on every example forgotten so far (%)", REFERENCE, ".2f", _I, row=False, headline=_I,
       when=_STREAM),
    _M("forget_val_error", "Forget-class validation error (%)", REFERENCE, ".2f", _I, row=False),
    _M("forget_test_error", "Forget-class test error (%)", REFERENCE, ".2f", _I, row=False),
    _M("forget_target_error", "Forget error of a model that never saw it (%)", REFERENCE, ".2f", _I, row=False),
    _M("forgotten_val_error", "Error a model that never saw them would show (%)", REFERENCE, ".2f", _I, row=False,
       when=_STREAM),
    _M("forgotten_mia", "Basic MIA on every example forgotten so far (%)", REFERENCE, ".2f", _I, row=False,
       when=_STREAM),
    # any text data (engine/eval/text.py)
    _M("forget_nll", "Forget NLL per token", REFERENCE, ".4g", (TEXT,), headline=(TEXT,)),
    _M("holdout_nll", "Holdout NLL per token (never trained on)", LOWER, ".4g", (TEXT,), headline=(TEXT,)),
    _M("retain_nll", "Retain NLL per token", LOWER, ".4g", (TEXT,), headline=(TEXT,)),
    _M("forget_verbatim_rouge", "Forget verbatim ROUGE-L recall", REFERENCE, ".4g", (TEXT,), headline=(TEXT,)),
    # open-unlearning's memorization metrics on the forget rows (engine/eval/memorization.py); TOFU's rows
    # follow its forget answer probability
    _M("extraction_strength", "Forget extraction strength", REFERENCE, ".4g", (TOFU, TEXT, MUSE),
       after=((TOFU, "forget_Q_A_Prob"),)),
    _M("exact_memorization", "Forget exact memorization", REFERENCE, ".4g", (TOFU, TEXT, MUSE),
       after=((TOFU, "extraction_strength"),)),
    # TOFU (engine/eval/tofu.py), open-unlearning's names
    _M("forget_quality", "Forget quality (KS p vs retain model; higher = closer)", HIGHER, ".4g", (TOFU,),
       headline=(TOFU,), depends=("forget_truth_ratio",)),
    _M("model_utility", "Model utility (harmonic mean of 9)", HIGHER, ".4g", (TOFU,), headline=(TOFU,),
       depends=_UTILITY),
    _M("forget_Q_A_ROUGE", "Forget ROUGE-L recall", REFERENCE, ".4g", (TOFU,), headline=(TOFU,)),
    _M("forget_Q_A_Prob", "Forget answer probability", REFERENCE, ".4g", (TOFU,), headline=(TOFU,)),
    _M("forget_truth_ratio", "Forget truth ratio", REFERENCE, ".4g", (TOFU,)),
    # both language-model suites: forget rows against holdout rows; privleak on Min-K% against the reference's AUC
    _M("mia_loss", "MIA AUC: LOSS", REFERENCE, ".4g", _TT),
    _M("mia_zlib", "MIA AUC: zlib", REFERENCE, ".4g", _TT),
    _M("mia_min_k", "MIA AUC: Min-K%", REFERENCE, ".4g", _TT, headline=(TEXT,)),
    _M("mia_min_k_plus_plus", "MIA AUC: Min-K%++", REFERENCE, ".4g", _TT),
    _M("privleak", "privleak (%)", REFERENCE, ".4g", _TT, headline=_TT, depends=("mia_min_k",),
       after=((TOFU, "forget_truth_ratio"),)),
    _M("retain_Q_A_ROUGE", "Retain ROUGE-L recall", HIGHER, ".4g", (TOFU,)),
    _M("retain_Q_A_Prob", "Retain answer probability", HIGHER, ".4g", (TOFU,)),
    _M("ra_Q_A_ROUGE", "Real authors ROUGE-L recall", HIGHER, ".4g", (TOFU,)),
    _M("wf_Q_A_ROUGE", "World facts ROUGE-L recall", HIGHER, ".4g", (TOFU,)),
    _M("forget_Q_A_PARA_Prob", "Forget paraphrased answer probability", REFERENCE, ".4g", (TOFU,), row=False),
    _M("forget_Q_A_PERT_Prob", "Forget perturbed answer probability", REFERENCE, ".4g", (TOFU,), row=False),
    _M("retain_Q_A_PARA_Prob", "Retain paraphrased answer probability", HIGHER, ".4g", (TOFU,), row=False),
    _M("retain_Q_A_PERT_Prob", "Retain perturbed answer probability", LOWER, ".4g", (TOFU,), row=False),
    _M("retain_Truth_Ratio", "Retain truth ratio (true better)", HIGHER, ".4g", (TOFU,), row=False),
    _M("ra_Q_A_Prob", "Real authors answer probability", HIGHER, ".4g", (TOFU,), row=False),
    _M("ra_Q_A_PERT_Prob", "Real authors perturbed answer probability", LOWER, ".4g", (TOFU,), row=False),
    _M("ra_Q_A_Prob_normalised", "Real authors answer probability among the options", HIGHER, ".4g", (TOFU,), row=False),
    _M("ra_Truth_Ratio", "Real authors truth ratio (true better)", HIGHER, ".4g", (TOFU,), row=False),
    _M("wf_Q_A_Prob", "World facts answer probability", HIGHER, ".4g", (TOFU,), row=False),
    _M("wf_Q_A_PERT_Prob", "World facts perturbed answer probability", LOWER, ".4g", (TOFU,), row=False),
    _M("wf_Q_A_Prob_normalised", "World facts answer probability among the options", HIGHER, ".4g", (TOFU,), row=False),
    _M("wf_Truth_Ratio", "World facts truth ratio (true better)", HIGHER, ".4g", (TOFU,), row=False),
    # MUSE (engine/eval/muse.py), the MUSE authors' names for C1, C2 and C4; C3 is privleak above, and the paper's own
    _M("forget_verbmem_ROUGE", "Forget verbatim ROUGE-L F1 (C1)", REFERENCE, ".4g", (MUSE,), headline=(MUSE,)),
    _M("forget_knowmem_ROUGE", "Forget knowledge ROUGE-L F1 (C2)", REFERENCE, ".4g", (MUSE,), headline=(MUSE,)),
    _M("retain_knowmem_ROUGE", "Retain knowledge ROUGE-L F1 (C4)", HIGHER, ".4g", (MUSE,), headline=(MUSE,)),
    _M("privleak_muse", "privleak, MUSE's (AUC - AUC_ref) / AUC_ref (%)", REFERENCE, ".4g", (MUSE,),
       depends=("mia_min_k",), after=((MUSE, "privleak"),)),
)}
# fmt: on


def of_suite(suite: str) -> list[Metric]:
    """The suite's metrics in its order: registration order, each ``after`` row moved behind its key."""
    order = [m for m in METRICS.values() if suite in m.suites]
    for m in [m for m in order if dict(m.after).get(suite)]:
        order.remove(m)
        order.insert(order.index(METRICS[dict(m.after)[suite]]) + 1, m)
    return order


def rows(suite: str) -> list[Metric]:
    """The rows of the suite's metrics table in report.md."""
    return [m for m in of_suite(suite) if m.row]


def produced(suite: str) -> set[str]:
    """The keys the suite's evaluator returns whenever it runs (``when`` ones aside; the report's own aside)."""
    return {m.key for m in of_suite(suite) if not (m.when or m.reference_gap)}


def headline(*suites: str) -> tuple[str, ...]:
    """What model cards and log lines show: the suites' headline metrics, in order, each once."""
    return tuple(dict.fromkeys(m.key for s in suites for m in of_suite(s) if s in m.headline))


def describe(metrics: dict, *suites: str) -> str:
    """The suites' headline metrics present in ``metrics`` in one line, for the log."""
    values = {k: metrics.get(k) for k in headline(*suites)}
    return "  ".join(f"{k}={format(v, METRICS[k].fmt)}" for k, v in values.items() if isinstance(v, Real))
