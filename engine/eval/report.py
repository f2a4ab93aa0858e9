"""A run's report: ``report.json`` (machine-readable), ``report.md`` (for people) and plots under ``plots/``.

Every file is written atomically (temporary name in the same folder, then ``os.replace``), so a reader never sees a
half-written report, even if the run is killed while writing it. Plots are drawn on a ``Figure`` with an explicit
Agg canvas instead of through ``pyplot``: no global backend switch, no GUI, safe from worker threads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from engine.eval import registry
from engine.io import atomic_write, json_safe

__all__ = [
    "write_report",
    "md_table",
    "fmt",
    "num",
    "plot_losses",
    "markdown_footer",
    "verdict",
]

_TOFU_NOTE = (
    "Forget quality: p-value of a KS test between this model's and the retain-only model's truth ratios on the "
    "forget set (open-unlearning's definition); p >= 0.05 means no detectable difference. MIA AUC: forget vs "
    "holdout authors, 0.5 = cannot tell members apart."
)
_TEXT_NOTE = (
    "Forgotten rows should look like rows the model never saw: forget NLL near the holdout NLL (far below it: "
    "memorised; far above it: over-forgotten, itself a membership signal), MIA AUC near 0.5, privleak near 0 "
    "against Retrain. Verbatim ROUGE: the greedy continuation of each forget row's first half against its second."
)

_MUSE_NOTE = (
    "MUSE (Shi et al. 2024): C1 verbatim ROUGE-L F1 of 128-token continuations of forget prompts, C2/C4 ROUGE-L F1 "
    "of answers to forget/retain questions with MUSE's in-context examples, C3 privleak on Min-K% forget vs holdout "
    "articles against Retrain (privleak_muse: the paper's (AUC - AUC_ref) / AUC_ref). Forgetting reads as C1 and C2 "
    "near Retrain's, privleak near 0; utility as C4 kept."
)


@dataclass(frozen=True)
class _Layout:
    """What a suite's report shows besides its metric rows (engine/eval/registry.py): the history's number format,
    the reference model's name, the history columns (None: a history row's own keys) and which of them the history
    plot draws."""

    spec: str
    reference: str
    history: list | None
    plotted: dict
    ylabel: str
    plot: tuple[str, str]  # (file under plots/, title)
    note: str = ""


LAYOUTS = {
    "image_classification": _Layout(
        ".2f", "Retrain",
        ["epoch", "lr", "forget_error", "retain_error", "test_error", "val_error", "max_loss", "min_loss"],
        {"forget_error": "tab:red", "retain_error": "tab:blue", "test_error": "tab:green"}, "error (%)",
        ("errors.png", "Errors per epoch"),
    ),
    "text": _Layout(
        ".4g", "Retrain", None,
        {"forget_nll": "tab:red", "retain_nll": "tab:blue", "holdout_nll": "tab:green"}, "NLL per token",
        ("nll.png", "NLL per epoch"), _TEXT_NOTE,
    ),
    "tofu": _Layout(
        ".4g", "Retain model", None,
        {"forget_nll": "tab:red", "retain_nll": "tab:blue", "holdout_nll": "tab:green"}, "answer NLL",
        ("nll.png", "Answer NLL per epoch"), _TOFU_NOTE,
    ),
    "muse": _Layout(
        ".4g", "Retrain", None,
        {"forget_nll": "tab:red", "retain_nll": "tab:blue", "holdout_nll": "tab:green"}, "NLL per token",
        ("nll.png", "NLL per epoch"), _MUSE_NOTE,
    ),
}  # fmt: skip
DASH = "–"


def write_report(run_dir: str | Path, report: dict) -> None:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` for one run of any task into ``run_dir``: the
    one report writer of every command.

    Keys of ``report`` (any may be absent or None): ``title``; ``task`` (engine/tasks); ``suite`` (which metric table:
    image_classification, tofu or text; default from the task); ``command`` ("run" | "train" | "eval"); ``method`` ({"name": ..., settings...});
    ``forget`` ({kind, description, size, ids_sha256}); ``metrics``, ``original`` (before unlearning) and
    ``reference`` (Retrain / the retain model), each the task's metrics (image classifiers: errors and MIA in
    percent; causal LMs: TOFU's); ``rewound`` (SCRUB+R: {epoch, the task's target and per-epoch series,
    metrics}); ``history`` (one dict per epoch, epoch 0 before unlearning); ``losses`` ({phase: [...]} per
    step); ``seconds``; ``backend``, ``memory``, ``teacher`` (where it ran); ``artifacts`` ({name: path
    relative to run_dir}).

    The Markdown metrics table has one column per model present (Original, this run, SCRUB+R, reference).
    Non-finite floats become ``null`` in the JSON. ``plots/errors.png`` (``nll.png``) is written when there is a history,
    ``plots/losses.png`` when there are per-step losses.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    suite = _suite(report)
    layout = LAYOUTS[suite]
    plots: dict[str, str] = {}
    file, title = layout.plot
    if _plot_history(run_dir / "plots" / file, report.get("history") or [], report.get("reference"), layout):
        plots[title] = f"plots/{file}"
    if plot_losses(run_dir / "plots" / "losses.png", report.get("losses") or {}):
        plots["Losses per step"] = "plots/losses.png"
    if report.get("command") == "run":  # the verdict's three lines, for scripts too
        report = {**report, "verdict": verdict(report)}
    text = json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n"
    atomic_write(run_dir / "report.json", lambda f: f.write(text.encode("utf-8")))
    markdown = _markdown(report, plots, suite)
    atomic_write(run_dir / "report.md", lambda f: f.write(markdown.encode("utf-8")))


def _suite(report: dict) -> str:
    return report.get("suite") or {"causal_lm": "tofu"}.get(report.get("task"), "image_classification")


def num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def fmt(value: Any, spec: str = ".2f") -> str:
    x = num(value)
    return DASH if x is None else format(x, spec)


def _cell(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(json_safe(value), separators=(",", ":"))
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table; cells are str()-ed (containers as compact JSON) with ``|`` escaped."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


# The verdict's tolerances: image classifiers, in points of error (the forget error within 5 points of Retrain's,
# the test error at most 2 points above the Original's); causal LMs, relative to the NLL per token.
FORGET_POINTS, TEST_POINTS, NLL_SHARE = 5.0, 2.0, 0.10


def verdict(report: dict) -> list[str]:
    """Three lines a non-expert can read: forgotten or not, utility kept or not, time against retraining.
    Empty when the run has no reference (Retrain) to judge against."""
    metrics, original, reference = (report.get(k) or {} for k in ("metrics", "original", "reference"))
    suite = _suite(report)
    if not metrics or not reference:
        return []
    ref_name = LAYOUTS[suite].reference
    lines = []
    if suite == "image_classification":
        f, rf = num(metrics.get("forget_error")), num(reference.get("forget_error"))
        if f is not None and rf is not None:
            d = f - rf
            state = "**Forgotten: yes.**" if abs(d) <= FORGET_POINTS else (
                "**Forgotten: not fully.**" if d < 0 else "**Forgotten: yes, more than retraining would (over-forgotten).**")  # fmt: skip
            lines.append(f"{state} The model now gets {f:.1f}% of the forgotten examples wrong; a model retrained "
                         f"without them gets {rf:.1f}% wrong ({d:+.1f} points; within {FORGET_POINTS:g} counts).")  # fmt: skip
        t, ot = num(metrics.get("test_error")), num((original or {}).get("test_error"))
        if t is not None and ot is not None:
            d = t - ot
            state = "**Utility kept: yes.**" if d <= TEST_POINTS else "**Utility kept: no.**"
            lines.append(f"{state} Test error {t:.1f}% against {ot:.1f}% before unlearning ({d:+.1f} points; "
                         f"up to {TEST_POINTS:g} points worse counts as kept).")  # fmt: skip
    else:
        f, rf = num(metrics.get("forget_nll")), num(reference.get("forget_nll"))
        if f is not None and rf is not None and rf > 0:
            d = (f - rf) / rf
            state = "**Forgotten: yes.**" if abs(d) <= NLL_SHARE else (
                "**Forgotten: not fully.**" if d < 0 else "**Forgotten: yes, more than retraining would (over-forgotten).**")  # fmt: skip
            lines.append(f"{state} Loss on the forgotten text {f:.3f} per token; the {ref_name.lower()}, never "
                         f"trained on it, has {rf:.3f} ({d:+.0%}; within {NLL_SHARE:.0%} counts).")  # fmt: skip
        key = "model_utility" if suite == "tofu" else "retain_nll"
        u, ou = num(metrics.get(key)), num((original or {}).get(key))
        if u is not None and ou is not None and ou > 0:
            d = (u - ou) / ou
            kept = d >= -NLL_SHARE if key == "model_utility" else d <= NLL_SHARE
            what = "Model utility" if key == "model_utility" else "Loss on the kept text"
            lines.append(f"**Utility kept: {'yes' if kept else 'no'}.** {what} {u:.3f} against {ou:.3f} before "
                         f"unlearning ({d:+.0%}; up to {NLL_SHARE:.0%} {'lower' if key == 'model_utility' else 'higher'} counts as kept).")  # fmt: skip
    seconds, ref_seconds = num(report.get("train_seconds")), num(report.get("reference_seconds"))
    if seconds is not None and ref_seconds:
        lines.append(f"**Time: {seconds / ref_seconds:.2f} of retraining.** Unlearning took {seconds:.0f} s; "
                     f"retraining from scratch without the forgotten data took {ref_seconds:.0f} s.")  # fmt: skip
    elif seconds is not None:
        lines.append(
            f"**Time:** unlearning took {seconds:.0f} s (the retrained model's time is not recorded)."
        )
    return lines


def _markdown(report: dict, plots: dict[str, str], suite: str) -> str:
    layout = LAYOUTS[suite]
    method = report.get("method") or {}
    name = str(method.get("name") or "This run")
    out = [f"# {report.get('title') or 'Unlearning report'}", ""]
    lines = report.get("verdict") or []
    if lines:  # a blank-line-free block: three lines, then the tables
        out += ["## Verdict", "", *[f"- {line}" for line in lines], ""]
    if report.get("command"):
        out += [f"Command: `{report['command']}`", ""]

    columns: list[tuple[str, dict]] = []
    if report.get("original"):
        columns.append(("Original", report["original"]))
    columns.append((name, report.get("metrics") or {}))
    rewound = report.get("rewound")
    if rewound:
        columns.append((f"SCRUB+R (epoch {rewound.get('epoch', DASH)})", rewound.get("metrics") or {}))
    reference = report.get("reference")
    if reference:
        columns.append((layout.reference, reference))
    rows = [[m.label] + [fmt(_gap(c, reference, m.depends) if m.reference_gap else c.get(m.key), m.fmt)
                         for _, c in columns] for m in registry.rows(suite) if reference or not m.reference_gap]  # fmt: skip
    out += ["## Metrics", "", *md_table(["Metric"] + [c for c, _ in columns], rows), ""]
    out += [layout.note, ""] if layout.note else []
    if rewound:
        # the task names its target and series: target_error / forget_errors, or target_nll / forget_nlls
        target_key, target = next(
            ((k, v) for k, v in rewound.items() if k.startswith("target_")), ("target", None)
        )
        per_epoch = next((v for k, v in rewound.items() if k.startswith("forget_")), [])
        out += [
            f"SCRUB+R rewound to epoch {rewound.get('epoch', DASH)} ({target_key.replace('_', ' ')} {fmt(target, '.4g')}; "
            f"per epoch from epoch 0: {', '.join(fmt(e, '.4g') for e in per_epoch or []) or DASH}).",
            "",
        ]

    forget = report.get("forget") or {}
    if forget:
        out += ["## Forget set", ""]
        out += [f"- Kind: {forget.get('kind', DASH)}", f"- Description: {forget.get('description', DASH)}"]
        out += [
            f"- Size: {forget.get('size', DASH)}",
            f"- IDs (sha256 of the sorted ids' JSON array): `{forget.get('ids_sha256', DASH)}`",
        ]
        out.append("")

    settings = [[k, v] for k, v in method.items() if k != "name"]
    out += [f"## Method: {name}", ""]
    out += [*md_table(["Setting", "Value"], settings), ""] if settings else ["No settings recorded.", ""]

    history = report.get("history") or []
    if history:
        keys = layout.history or [k for k in history[-1] if k != "eval_seconds"]
        if layout.history and any("max_steps" in h for h in history):  # SCRUB's calibrated schedule
            keys = [*keys, "target_error", "max_steps"]
        specs = {"epoch": ".0f", "lr": ".3g", "max_loss": ".4f", "min_loss": ".4f", "max_steps": ".0f"}
        hrows = [[fmt(h.get(k), specs.get(k, layout.spec)) for k in keys] for h in history]
        out += ["## History (epoch 0 = before unlearning)", "", *md_table(keys, hrows), ""]
        checks = report.get("schedule_checks")
        # checks restored from a checkpoint written before checks were timed have no seconds: no line then
        if checks and all("seconds" in c for c in checks):
            spent = sum(c["seconds"] for c in checks)
            out += [f"Checks inside max phases: {len(checks)}, {spent:.1f} s of the training's "
                    f"{fmt(report.get('train_seconds'), '.1f')} s.", ""]  # fmt: skip
    out += _resources(report)
    return "\n".join(out + markdown_footer(report, plots))


def _resources(report: dict) -> list[str]:
    """Where it ran, whether the teacher stayed untouched, and per-rank memory."""
    out = []
    backend = report.get("backend")
    if backend:
        stage = "" if backend.get("zero_stage") is None else f", ZeRO-{backend['zero_stage']}"
        out += ["## Where it ran", "", f"- backend `{backend['name']}`, {backend['world_size']} process(es)"
                f"{stage}, {backend.get('accumulation', 1)} micro-batch(es) per step"]  # fmt: skip
        teacher = report.get("teacher")
        if teacher:
            state = "unchanged (sha256 of every rank's weights equal before and after)"
            out.append(
                f"- teacher: {state if teacher['unchanged'] else 'CHANGED: this is a bug, please report it'}"
            )
        out.append("")
    memory = report.get("memory") or []
    if memory:
        mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
        rows = [
            [m["rank"], mib(m["peak_bytes"]), m["peak_kind"], mib(m["parameter_bytes"]),
             mib(m["gradient_bytes"]), mib(m["optimizer_bytes"]), mib(m["state_bytes"])]
            for m in memory
        ]  # fmt: skip
        head = [
            "rank",
            "peak MiB",
            "peak of",
            "parameters MiB",
            "gradients MiB",
            "optimizer MiB",
            "state MiB",
        ]
        out += ["## Memory per rank", "", *md_table(head, rows), ""]
    return out


def markdown_footer(report: dict, plots: dict[str, str]) -> list[str]:
    """The Time, Plots and Artifacts sections every report ends with."""
    out: list[str] = []
    seconds = num(report.get("seconds"))
    if seconds is not None:
        whole = round(seconds)
        line = f"{seconds:.1f} s ({whole // 3600} h {whole % 3600 // 60} min {whole % 60} s)"
        if num(report.get("train_seconds")) is not None:
            line += f"; {fmt(report['train_seconds'], '.1f')} s of it training / unlearning"
        out += ["## Time", "", line, ""]
    resume = report.get("resume")
    if resume:  # engine/checkpoint/resume.py: the times above are this attempt's
        how = (
            "its weights only, with a fresh optimizer" if resume.get("mode") == "weights_only" else "in full"
        )
        line = f"Resumed from the checkpoint of {resume['position']} (`{resume['checkpoint']}`), {how}"
        skipped = ", ".join(f"`{s['tag']}`" for s in resume.get("skipped") or [])
        out += [line + (f"; skipped as unusable: {skipped}" if skipped else "") + ".", ""]
    if plots:
        out += ["## Plots", ""] + [f"![{title}]({path})\n" for title, path in plots.items()]
    artifacts = report.get("artifacts") or {}
    if artifacts:
        out += ["## Artifacts", ""] + [f"- {k}: [{v}]({v})" for k, v in artifacts.items()] + [""]
    return out


def _gap(metrics: dict, reference: dict, keys: tuple[str, ...]) -> float | None:
    gaps = []
    for key in keys:
        a, b = num(metrics.get(key)), num(reference.get(key))
        if a is None or b is None:
            return None
        gaps.append(abs(a - b))
    return sum(gaps) / len(gaps)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # attaches an Agg canvas to the figure
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def _plot_history(path: Path, history: list[dict], reference: dict | None, layout: _Layout) -> bool:
    if not any(k in h for h in history for k in layout.plotted):
        return False
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    epochs = [num(h.get("epoch")) for h in history]
    xs = [i if e is None else e for i, e in enumerate(epochs)]
    for key, colour in layout.plotted.items():
        ys = [num(h.get(key)) for h in history]
        label = key.replace("_", " ")
        ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", color=colour, label=label)
        ref = num((reference or {}).get(key))
        if ref is not None:
            ax.axhline(ref, color=colour, linestyle="--", linewidth=1, label=f"{label} ({layout.reference})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0 = before unlearning)")
    ax.set_ylabel(layout.ylabel)
    ax.set_title(layout.plot[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_losses(path: Path, losses: dict) -> bool:
    """One panel per phase: SCRUB's max and min (both shown, even if one is empty), or whatever
    phases another method has (e.g. GradDiff's "paired")."""
    keys = ["max", "min"] if {"max", "min"} & set(losses) else list(losses)
    series = {key: [num(v) for v in losses.get(key) or []] for key in keys}
    if not any(series.values()):
        return False
    fig = Figure(figsize=(4.5 * len(keys), 3.8))
    titles = {"max": "max-step loss (forget set)", "min": "min-step loss (retain set)"}
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        if series[key]:
            ys = [np.nan if y is None else y for y in series[key]]
            ax.plot(range(len(ys)), ys, linewidth=1, color="tab:purple" if i == 0 else "tab:blue")
        else:
            ax.text(0.5, 0.5, f"no {key}-steps", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(titles.get(key, f"{key} loss"), fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    _save(fig, path)
    return True
