"""The report of a TOFU run: ``report.json`` (every metric, open-unlearning's key names), ``report.md``
(the headline table: original, this run, SCRUB+R, the retain-only model) and ``plots/``."""

from __future__ import annotations

import json
from pathlib import Path

from engine.eval.report import fmt, json_safe, markdown_footer, md_table, plot_losses, write_text_atomic

# (key, label, which direction is "forgotten" / "kept") for the Markdown table.
ROWS = [
    ("forget_quality", "Forget quality (KS p vs retain model; higher = closer)"),
    ("model_utility", "Model utility (harmonic mean of 9)"),
    ("forget_Q_A_ROUGE", "Forget ROUGE-L recall"),
    ("forget_Q_A_Prob", "Forget answer probability"),
    ("forget_truth_ratio", "Forget truth ratio"),
    ("privleak", "privleak (%)"),
    ("mia_loss", "MIA AUC: LOSS"),
    ("mia_zlib", "MIA AUC: zlib"),
    ("mia_min_k", "MIA AUC: Min-K%"),
    ("mia_min_k_plus_plus", "MIA AUC: Min-K%++"),
    ("retain_Q_A_ROUGE", "Retain ROUGE-L recall"),
    ("retain_Q_A_Prob", "Retain answer probability"),
    ("ra_Q_A_ROUGE", "Real authors ROUGE-L recall"),
    ("wf_Q_A_ROUGE", "World facts ROUGE-L recall"),
]


def write_tofu_report(run_dir: str | Path, report: dict) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    if plot_losses(run_dir / "plots" / "losses.png", report.get("losses") or {}):
        plots["Losses per step"] = "plots/losses.png"
    write_text_atomic(
        run_dir / "report.json", json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n"
    )
    write_text_atomic(run_dir / "report.md", _markdown(report, plots))


def _markdown(report: dict, plots: dict) -> str:
    method = report.get("method") or {}
    name = str(method.get("name") or "This model")
    out = [f"# {report.get('title') or 'TOFU report'}", ""]
    columns = [("Original", report.get("original")), (name, report.get("metrics"))]
    if report.get("rewound"):
        columns.append(
            (f"SCRUB+R (epoch {report['rewound'].get('epoch')})", report["rewound"].get("metrics"))
        )
    columns.append(("Retain model", report.get("reference")))
    columns = [(c, m) for c, m in columns if m]
    rows = [[label] + [fmt(m.get(key), ".4g") for _, m in columns] for key, label in ROWS]
    out += ["## TOFU metrics", "", *md_table(["Metric"] + [c for c, _ in columns], rows), ""]
    out += [
        "Forget quality: p-value of a KS test between this model's and the retain-only model's truth ratios "
        "on the forget set (open-unlearning's definition); p >= 0.05 means no detectable difference. MIA AUC: "
        "forget vs holdout authors, 0.5 = cannot tell members apart.",
        "",
    ]
    forget = report.get("forget") or {}
    if forget:
        out += ["## Forget set", "", f"- {forget.get('description', '')}"]
        out += [f"- IDs (sha256 of the sorted TOFU row ids): `{forget.get('ids_sha256', '')}`", ""]
    settings = [[k, v] for k, v in method.items() if k != "name"]
    if settings:
        out += [f"## Method: {name}", "", *md_table(["Setting", "Value"], settings), ""]
    history = report.get("history") or []
    if history:
        keys = [k for k in history[-1] if k != "eval_seconds"]
        rows = [[fmt(h.get(k), ".0f" if k == "epoch" else ".4f") for k in keys] for h in history]
        out += ["## History (answer NLL per epoch; epoch 0 = start)", "", *md_table(keys, rows), ""]
    out += _resources(report)
    return "\n".join(out + markdown_footer(report, plots))


def _resources(report: dict) -> list[str]:
    """Where it ran, whether it resumed, whether the teacher stayed untouched, and per-rank memory."""
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
