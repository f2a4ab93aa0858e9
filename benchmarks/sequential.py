"""How far does SCRUB drift from Retrain when deletion requests arrive one after another?

Real CIFAR-10 at configs/demo.yaml's size (5 classes, a narrow pre-activation ResNet-18). The Original is trained
once; then four deletion requests of disjoint forget sets arrive in turn: random examples across the other
classes (requests 1, 2 and 4) and one whole class (request 3). Every request is served through the engine's own
stream (`unlearn request add` + `unlearn request process`, engine/recipes/request.py) by three ledgers side by
side, each with its own versions v1..v4:

- ``scrub``: every version unlearned with the config's SCRUB from the previous version (no retraining policy);
- ``policy``: the same, with ``ledger.retrain_bound`` (``--bound`` points): a version whose error on every example
  forgotten so far drifts further than the bound from unseen data's error is retrained instead;
- ``retrain``: every version retrained from scratch on the cumulative retain set (``ledger.retrain_every=1``):
  the reference.

Errors and MIA are measured on the cumulative forget set (every id forgotten up to that request: report.json's
``forgotten_error``, ``forgotten_mia``); test error on the whole test set.

    python benchmarks/sequential.py --out runs/sequential            # 300 images/class, about 20 min
    python benchmarks/sequential.py --out /tmp/seq --quick           # same protocol, 100 images/class

Writes ``DIR/results.json`` ({"rows": [{"request", "forget_error", "retrain_forget_error", "test_error",
"retrain_test_error", "mia", "retrain_mia", "seconds", "retrain_seconds", ...}], "policy_rows": [...], "drift":
{...}}: ``rows`` = the scrub stream against the retrain reference, ``policy_rows`` = the policy stream), with
``DIR/results.md`` and ``DIR/forget_error.png``; the three streams' version folders and ledgers under ``DIR/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.sequential
    from _common import REPO, fmt, header_markdown, md_table, quiet_log, run_header, write_json, write_text
except ImportError:  # pragma: no cover
    from benchmarks._common import (
        REPO,
        fmt,
        header_markdown,
        md_table,
        quiet_log,
        run_header,
        write_json,
        write_text,
    )

DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"
QUICK = {"data.max_per_class": 100, "data.max_test_per_class": 100}  # vision_compare.py's --quick
STREAMS = ("retrain", "scrub", "policy")
# The demo's SCRUB with vision_compare.py's batches for small forget sets (16 forget / 32 retain per step)
SCRUB = ["method.forget_batch_size=16", "method.retain_batch_size=32"]


def _ov(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (results.json, results.md, streams)"
    )
    p.add_argument("--quick", action="store_true", help="same protocol, 100 images per class")
    p.add_argument(
        "--fraction", type=float, default=0.05, help="size of each random request (of the train set)"
    )
    p.add_argument(
        "--bound", type=float, default=10.0, help="the policy stream's ledger.retrain_bound (points)"
    )
    p.add_argument("--dataset", default=None, help=f"local folder/file or hub id (default: {DEFAULT_DATA})")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base config (configs/demo.yaml)")
    p.add_argument("--seed", type=int, default=0, help="draw of the random requests")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra override"
    )
    args = p.parse_args(argv)
    if not 0 < args.fraction < 0.2:
        p.error("--fraction must be in (0, 0.2): three random requests must fit beside a whole class")
    return args


def base_overrides(args: argparse.Namespace) -> list[str]:
    spec = args.dataset
    dataset = (
        str(DEFAULT_DATA) if spec is None else (str(Path(spec).resolve()) if Path(spec).exists() else spec)
    )
    ov = [
        _ov("data.dataset", dataset),
        "logging.progress=false",
        "backend.num_threads=1",
        "eval.reference=null",
    ]
    return ov + ([_ov(k, v) for k, v in QUICK.items()] if args.quick else [])


def draw_requests(
    train_ids: list, labels: np.ndarray, whole_class: int, fraction: float, seed: int
) -> list[list]:
    """Four disjoint id lists: random examples of the classes other than ``whole_class`` (1, 2, 4) and every
    training example of ``whole_class`` (3)."""
    rng = np.random.default_rng(seed)
    others = rng.permutation(np.flatnonzero(labels != whole_class))
    k = max(1, int(round(fraction * len(train_ids))))
    picks = [others[:k], others[k : 2 * k], np.flatnonzero(labels == whole_class), others[2 * k : 3 * k]]
    return [sorted(train_ids[i] for i in rows) for rows in picks]


def version_row(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    m, chain = report["metrics"], json.loads((folder / "receipt.json").read_text())["chain"]
    return {
        "forget_error": m.get("forgotten_error"),
        "test_error": m["test_error"],
        "mia": m.get("forgotten_mia"),
        "seconds": report["train_seconds"],
        "made_by": chain["made_by"],
        "drift": (chain.get("policy") or {}).get("candidate", {}).get("drift"),
    }


def rows_against(
    stream: list[dict], reference: list[dict], sizes: list[int], wall: list[float]
) -> list[dict]:
    out = []
    for i, (s, r) in enumerate(zip(stream, reference, strict=True)):
        row = {"request": i + 1, "forget_size": sizes[i]}
        for k in ("forget_error", "test_error", "mia", "seconds"):
            row[k], row[f"retrain_{k}"] = _r(s[k]), _r(r[k])
        row.update(made_by=s["made_by"], candidate_drift=_r(s["drift"]), wall_seconds=_r(wall[i]))
        out.append(row)
    return out


def _r(x, digits: int = 4):
    return None if x is None else round(float(x), digits)


def drift_summary(rows: list[dict]) -> dict:
    gaps = [abs(r["forget_error"] - r["retrain_forget_error"]) for r in rows]
    test = [abs(r["test_error"] - r["retrain_test_error"]) for r in rows]
    mia = [abs(r["mia"] - r["retrain_mia"]) for r in rows]
    secs = sum(r["seconds"] for r in rows) / sum(r["retrain_seconds"] for r in rows)
    return {"forget_gap_mean": _r(np.mean(gaps)), "forget_gap_last": _r(gaps[-1]), "forget_gap_max": _r(max(gaps)),
            "test_gap_mean": _r(np.mean(test)), "mia_gap_mean": _r(np.mean(mia)), "seconds_vs_retrain": _r(secs),
            "retrained_versions": sum(r["made_by"] == "retrain" for r in rows)}  # fmt: skip


def table(rows: list[dict]) -> list[str]:
    header = ["request", "forgotten", "made by", "forget err", "Retrain's", "test err", "Retrain's", "MIA",
              "Retrain's", "seconds", "Retrain's"]  # fmt: skip
    body = [
        [str(r["request"]), str(r["forget_size"]), r["made_by"]]
        + [
            fmt(r[k])
            for k in (
                "forget_error",
                "retrain_forget_error",
                "test_error",
                "retrain_test_error",
                "mia",
                "retrain_mia",
            )
        ]  # fmt: skip
        + [fmt(r["seconds"], ".1f"), fmt(r["retrain_seconds"], ".1f")]
        for r in rows
    ]
    return md_table(header, body)


def plot(result: dict, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [r["request"] for r in result["rows"]]
    ax.plot(xs, [r["retrain_forget_error"] for r in result["rows"]], "k-o", label="Retrain")
    ax.plot(xs, [r["forget_error"] for r in result["rows"]], "r-o", label="SCRUB, no policy")
    ax.plot(
        xs,
        [r["forget_error"] for r in result["policy_rows"]],
        "b--s",
        label=f"SCRUB + bound {result['bound']}",
    )
    ax.set_xticks(xs)
    ax.set_xlabel("request (3: a whole class)")
    ax.set_ylabel("error on every example forgotten so far (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "forget_error.png", format="png", dpi=120)


def render(result: dict) -> str:
    d = result["drift"]
    out = [
        f"# {result['title']}",
        "",
        *header_markdown(result["header"]),
        f"- Wall time: {result['wall_seconds']:.1f} s",
        "",
    ]
    out += ["## SCRUB, no retraining policy", "", *table(result["rows"]), ""]
    out += [f"## SCRUB with ledger.retrain_bound={result['bound']}", "", *table(result["policy_rows"]), ""]
    out += ["## Drift from Retrain", ""]
    out += md_table(
        ["stream", "mean |forget err gap|", "at request 4", "max", "mean |test err gap|", "mean |MIA gap|",
         "retrained versions", "time / Retrain's"],
        [[name, fmt(s["forget_gap_mean"]), fmt(s["forget_gap_last"]), fmt(s["forget_gap_max"]),
          fmt(s["test_gap_mean"]), fmt(s["mia_gap_mean"]), str(s["retrained_versions"]), fmt(s["seconds_vs_retrain"], ".3f")]
         for name, s in d.items()],
    )  # fmt: skip
    out += [
        "",
        "Errors and MIA in percent, on the cumulative forget set (every id forgotten up to the request); test error "
        "on the whole test set. seconds: the version's training/unlearning loop (`train_seconds`); a version the "
        "bound retrained counts its retraining only (its discarded candidate's drift is in `candidate_drift`).",
        "",
        "![forget error per request](forget_error.png)",
        "",
        "## Settings",
        "",
        f"- Requests (ids per request): {[len(r) for r in result['requests']]}; whole class: {result['whole_class']}",
        f"- SCRUB: `{json.dumps(result['scrub'])}`",
        f"- Size: {'--quick ' + json.dumps(QUICK) if result['quick'] else 'configs/demo.yaml sizes'}",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    header = run_header(sys.argv[1:] if argv is None else argv)

    from engine.config import load_config
    from engine.data.vision import prepare_data
    from engine.recipes.request import add_request, ledger_path, process_requests
    from engine.recipes.train import run_training
    from engine.requests.ledger import Ledger

    log = quiet_log(t_start)

    out = args.out.expanduser().resolve()
    models = out / "models"
    base = base_overrides(args)
    train_cfg = load_config(
        args.config,
        base + [_ov("output_dir", str(models)), _ov("model.path", str(models / "original")), "overwrite=true",
                "eval.every_epoch=false"] + args.overrides,
    )  # fmt: skip
    if not (models / "original" / "config.json").is_file():
        log(f"training the Original -> {models / 'original'}")
        run_training(train_cfg, targets=("original",), log=lambda m: log(f"original | {m}"))
    data = prepare_data(train_cfg.data, train_cfg.forget)
    whole = data.forget_classes[0]  # the config's forget.label: the class request 3 forgets
    train = data.train
    requests = draw_requests(list(train.ids), train.labels.numpy(), whole, args.fraction, args.seed)

    stream_ov = {
        "retrain": ["ledger.retrain_every=1"],
        "scrub": [],
        "policy": [_ov("ledger.retrain_bound", args.bound)],
    }
    cfgs = {
        name: load_config(
            args.config,
            base
            + [
                _ov("output_dir", str(out / name)),
                _ov("model.path", str(models / "original")),
                "forget.kind=ids",
                _ov("forget.ids", requests[0]),
                "forget.label=null",
                "eval.every_epoch=false",
            ]
            + SCRUB
            + ov
            + args.overrides,
        )  # fmt: skip
        for name, ov in stream_ov.items()
    }
    versions = {name: [] for name in STREAMS}
    wall = {name: [] for name in STREAMS}
    for i, ids in enumerate(requests, start=1):
        ids_file = out / "requests" / f"request_{i}.json"
        ids_file.parent.mkdir(parents=True, exist_ok=True)
        ids_file.write_text(json.dumps(ids))
        for name in STREAMS:
            folder = out / name / f"v{i}"
            if not folder.exists():  # a rerun after an interruption resumes each stream where it stopped
                ledger = Ledger(ledger_path(cfgs[name]))
                known = len(ledger.requests())
                ledger.close()
                if known < i:
                    add_request(cfgs[name], str(ids_file), note=f"sequential.py request {i}", log=log)
                t = time.perf_counter()
                process_requests(cfgs[name], log=lambda m, name=name: log(f"{name} | {m}"))
                wall[name].append(time.perf_counter() - t)
            else:
                wall[name].append(float("nan"))
            versions[name].append(version_row(folder))
            v = versions[name][-1]
            log(f"{name} v{i}: {v['made_by']}, forget err {fmt(v['forget_error'])}, test err {fmt(v['test_error'])}, "
                f"mia {fmt(v['mia'])}, {v['seconds']:.1f} s")  # fmt: skip

    sizes = list(np.cumsum([len(r) for r in requests]).tolist())
    rows = rows_against(versions["scrub"], versions["retrain"], sizes, wall["scrub"])
    policy_rows = rows_against(versions["policy"], versions["retrain"], sizes, wall["policy"])
    title = (
        f"Four deletion requests in turn on {Path(train_cfg.data.dataset).name} ({train_cfg.model.arch} "
        f"x{train_cfg.model.width}): SCRUB against Retrain" + (" [--quick]" if args.quick else "")
    )
    result = {
        "rows": rows,
        "policy_rows": policy_rows,
        "drift": {"scrub": drift_summary(rows), f"scrub + bound {args.bound}": drift_summary(policy_rows)},
        "bound": args.bound,
        "title": title,
        "header": header,
        "quick": args.quick,
        "requests": requests,
        "whole_class": data.class_names[whole],
        "scrub": cfgs["scrub"].method.model_dump(mode="json"),
        "wall_seconds": time.perf_counter() - t_start,
    }
    plot(result, out)
    write_json(out / "results.json", result)
    write_text(out / "results.md", render(result))
    print("\n" + title + "\n\nno policy:\n" + "\n".join(table(rows)))
    print(f"\nretrain_bound {args.bound}:\n" + "\n".join(table(policy_rows)))
    print("\n" + json.dumps(result["drift"], indent=1))
    print(f"\nwall time {result['wall_seconds']:.1f} s; results in {out / 'results.md'}")
    return result


if __name__ == "__main__":
    from engine.errors import EngineError

    try:
        main()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
