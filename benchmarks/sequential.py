"""How far does SCRUB drift from Retrain when deletion requests arrive one after another?

Real CIFAR-10 at configs/demo.yaml's size (5 classes, a narrow pre-activation ResNet-18). The Original is
trained once; then four deletion requests of disjoint forget sets arrive in turn: random examples across the
other classes (requests 1, 2 and 4) and one whole class (request 3). Every request is served through the
engine's own stream (`unlearn request add` + `unlearn request process`, engine/recipes/request.py) by three
ledgers side by side, each with its own versions v1..v4:

- ``scrub``: every version unlearned with the config's SCRUB from the previous version (no retraining policy);
- ``policy``: the same, with ``ledger.retrain_bound`` (``--bound`` points): a version whose error on every
  example forgotten so far drifts further than the bound from unseen data's error is retrained instead;
- ``retrain``: every version retrained from scratch on the cumulative retain set (``ledger.retrain_every=1``):
  the reference.

Errors and MIA are measured on the cumulative forget set (every id forgotten up to that request: report.json's
``forgotten_error``, ``forgotten_mia``); test error on the whole test set.

    python -m benchmarks.sequential --out runs/sequential   # 300 images/class, about 20 min
    python -m benchmarks.sequential --out /tmp/seq --quick  # same protocol, 100 images/class

Writes ``DIR/results.json`` (``rows``: the scrub stream against the retrain reference, ``policy_rows``: the
policy stream's, ``drift``; benchmarks/README.md lists the fields), ``DIR/results.md`` and
``DIR/forget_error.png``; the three streams' version folders and ledgers under ``DIR/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks import kit
from benchmarks.kit import fmt, ov

STREAMS = ("retrain", "scrub", "policy")
# The demo's SCRUB with benchmarks/methods.yaml's batches for small forget sets (16 forget / 32 retain per
# step): its method.* keys only, not method=scrub, so that --set method=NAME may still switch
SCRUB = kit.method_overrides("scrub")[1:]
COLUMNS = [("request", "request"), ("forgotten", "forget_size"), ("made by", "made_by"),
           ("forget err", "forget_error", ".2f"), ("Retrain's", "retrain_forget_error", ".2f"),
           ("test err", "test_error", ".2f"), ("Retrain's", "retrain_test_error", ".2f"),
           ("MIA", "mia", ".2f"), ("Retrain's", "retrain_mia", ".2f"), ("seconds", "seconds", ".1f"),
           ("Retrain's", "retrain_seconds", ".1f")]  # fmt: skip
DRIFT = [("stream", "stream"), ("mean |forget err gap|", "forget_gap_mean", ".2f"),
         ("at request 4", "forget_gap_last", ".2f"), ("max", "forget_gap_max", ".2f"),
         ("mean |test err gap|", "test_gap_mean", ".2f"), ("mean |MIA gap|", "mia_gap_mean", ".2f"),
         ("retrained versions", "retrained_versions"),
         ("time / Retrain's", "seconds_vs_retrain", ".3f")]  # fmt: skip


def parse_args(argv: list[str] | None = None):
    p = kit.parser(__doc__, "same protocol, 100 images per class (vision_compare.py's --quick)", vision=True)
    p.add_argument(
        "--fraction", type=float, default=0.05, help="size of each random request (of the train set)"
    )
    p.add_argument(
        "--bound", type=float, default=10.0, help="the policy stream's ledger.retrain_bound (points)"
    )
    p.set_defaults(seed=0)  # here: the draw of the random requests
    args = p.parse_args(argv)
    if not 0 < args.fraction < 0.2:
        p.error("--fraction must be in (0, 0.2): three random requests must fit beside a whole class")
    return args


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
    report, chain = kit.read_json(folder / "report.json"), kit.read_json(folder / "receipt.json")["chain"]
    m = report["metrics"]
    return {"forget_error": m.get("forgotten_error"), "test_error": m["test_error"],
            "mia": m.get("forgotten_mia"), "seconds": report["train_seconds"], "made_by": chain["made_by"],
            "drift": (chain.get("policy") or {}).get("candidate", {}).get("drift")}  # fmt: skip


def rows_against(
    stream: list[dict], reference: list[dict], sizes: list[int], wall: list[float]
) -> list[dict]:
    out = []
    for i, (s, r) in enumerate(zip(stream, reference, strict=True)):
        row = {"request": i + 1, "forget_size": sizes[i]}
        for k in ("forget_error", "test_error", "mia", "seconds"):
            row[k], row[f"retrain_{k}"] = kit.rounded(s[k]), kit.rounded(r[k])
        row.update(
            made_by=s["made_by"], candidate_drift=kit.rounded(s["drift"]), wall_seconds=kit.rounded(wall[i])
        )
        out.append(row)
    return out


def drift_summary(rows: list[dict]) -> dict:
    gaps = [abs(r["forget_error"] - r["retrain_forget_error"]) for r in rows]
    test = [abs(r["test_error"] - r["retrain_test_error"]) for r in rows]
    mia = [abs(r["mia"] - r["retrain_mia"]) for r in rows]
    secs = sum(r["seconds"] for r in rows) / sum(r["retrain_seconds"] for r in rows)
    r = kit.rounded
    return {"forget_gap_mean": r(np.mean(gaps)), "forget_gap_last": r(gaps[-1]),
            "forget_gap_max": r(max(gaps)), "test_gap_mean": r(np.mean(test)),
            "mia_gap_mean": r(np.mean(mia)), "seconds_vs_retrain": r(secs),
            "retrained_versions": sum(r["made_by"] == "retrain" for r in rows)}  # fmt: skip


def plot(result: dict, out: Path) -> None:
    rows, xs = result["rows"], [r["request"] for r in result["rows"]]
    with kit.figure(out / "forget_error.png", (6.5, 4.2)) as ax:
        ax.plot(xs, [r["retrain_forget_error"] for r in rows], "k-o", label="Retrain")
        ax.plot(xs, [r["forget_error"] for r in rows], "r-o", label="SCRUB, no policy")
        policy = [r["forget_error"] for r in result["policy_rows"]]
        ax.plot(xs, policy, "b--s", label=f"SCRUB + bound {result['bound']}")
        ax.set_xticks(xs)
        ax.set_xlabel("request (3: a whole class)")
        ax.set_ylabel("error on every example forgotten so far (%)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def render(result: dict) -> str:
    drift = [{"stream": name, **s} for name, s in result["drift"].items()]
    out = ["## SCRUB, no retraining policy", "", *kit.table(result["rows"], COLUMNS), ""]
    out += [
        f"## SCRUB with ledger.retrain_bound={result['bound']}",
        "",
        *kit.table(result["policy_rows"], COLUMNS),
    ]
    out += ["", "## Drift from Retrain", "", *kit.table(drift, DRIFT), ""]
    out += [
        "Errors and MIA in percent, on the cumulative forget set (every id forgotten up to the request); "
        "test error on the whole test set. seconds: the version's training/unlearning loop "
        "(`train_seconds`); a version the bound retrained counts its retraining only (its discarded "
        "candidate's drift is in `candidate_drift`).",
        "",
        "![forget error per request](forget_error.png)",
        "",
        "## Settings",
        "",
        f"- Requests (ids per request): {[len(r) for r in result['requests']]}; "
        f"whole class: {result['whole_class']}",
        f"- SCRUB: `{json.dumps(result['scrub'])}`",
        f"- Size: {kit.preset(result['quick'])}",
        "",
    ]
    return kit.document(result["title"], result["header"], out, result["wall_seconds"])


def configs(args, out: Path, first: list | None = None):
    """The Original's training config, and each stream's (``first``: the first request's ids)."""
    from engine.config import load_config

    models = out / "models"
    # the requests' seed (--seed) is not the runs'; overwrite only where the Original is trained
    base = kit.vision_overrides(args, seed=None, overwrite=None) + ["eval.reference=null"]
    base += [ov("model.path", str(models / "original")), "eval.every_epoch=false"]
    train = load_config(args.config, base + [ov("output_dir", str(models)), "overwrite=true"] + args.set)
    extra = {
        "retrain": ["ledger.retrain_every=1"],
        "scrub": [],
        "policy": [ov("ledger.retrain_bound", args.bound)],
    }
    forget = ["forget.kind=ids", ov("forget.ids", first or []), "forget.label=null"]
    streams = {}
    for name in STREAMS:
        own = [ov("output_dir", str(out / name)), *forget, *SCRUB, *extra[name]]
        streams[name] = load_config(args.config, base + own + args.set)
    return train, streams


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = kit.Run(args, argv)
    log, out = run.log, run.out

    from engine.data.vision import prepare_data
    from engine.recipes.request import add_request, ledger_path, process_requests
    from engine.recipes.train import run_training
    from engine.requests.ledger import Ledger

    train_cfg, _ = configs(args, out)
    original = out / "models" / "original"
    if not (original / "config.json").is_file():
        log(f"training the Original -> {original}")
        run_training(train_cfg, targets=("original",), log=lambda m: log(f"original | {m}"))
    data = prepare_data(train_cfg.data, train_cfg.forget)
    whole = data.forget_classes[0]  # the config's forget.label: the class request 3 forgets
    train = data.train
    requests = draw_requests(list(train.ids), train.labels.numpy(), whole, args.fraction, args.seed)
    _, cfgs = configs(args, out, requests[0])
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
                t = run.seconds()
                process_requests(cfgs[name], log=lambda m, name=name: log(f"{name} | {m}"))
                wall[name].append(run.seconds() - t)
            else:
                wall[name].append(float("nan"))
            versions[name].append(version_row(folder))
            v = versions[name][-1]
            log(f"{name} v{i}: {v['made_by']}, forget err {fmt(v['forget_error'])}, "
                f"test err {fmt(v['test_error'])}, mia {fmt(v['mia'])}, {v['seconds']:.1f} s")  # fmt: skip

    sizes = list(np.cumsum([len(r) for r in requests]).tolist())
    rows = rows_against(versions["scrub"], versions["retrain"], sizes, wall["scrub"])
    policy_rows = rows_against(versions["policy"], versions["retrain"], sizes, wall["policy"])
    title = (
        f"Four deletion requests in turn on {Path(train_cfg.data.dataset).name} ({train_cfg.model.arch} "
        f"x{train_cfg.model.width}): SCRUB against Retrain" + (" [--quick]" if args.quick else "")
    )
    drift = {"scrub": drift_summary(rows), f"scrub + bound {args.bound}": drift_summary(policy_rows)}
    result = {"rows": rows, "policy_rows": policy_rows, "drift": drift, "bound": args.bound, "title": title,
              "header": run.header, "quick": args.quick, "requests": requests,
              "whole_class": data.class_names[whole], "scrub": cfgs["scrub"].method.model_dump(mode="json"),
              "wall_seconds": run.seconds()}  # fmt: skip
    plot(result, out)
    return run.finish(result, render(result), title, "", "no policy:", *kit.table(rows, COLUMNS), "",
                      f"retrain_bound {args.bound}:", *kit.table(policy_rows, COLUMNS), "",
                      json.dumps(drift, indent=1))  # fmt: skip


if __name__ == "__main__":
    kit.main(main)
