"""What the benchmarks share: default paths, the key=value overrides and size presets, the methods'
settings (benchmarks/methods.yaml), the arguments every script takes, and how a result is headed, tabled
and written (the step-timing benchmarks' own parts are in timing.py).

Every benchmark writes ``results.json`` (machine-readable) and ``results.md`` (for people), both headed by
the same facts: the command line, the git commit of the checkout, the machine and the date, so a number can
always be traced back to what produced it. Files are written atomically (engine/io.py). Nothing here imports
matplotlib or datasets until asked (the GPU machine has neither): the report's ``fmt``, ``md_table`` and
``num`` (engine/eval/report.py) are loaded on first use.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.io import json_safe
from engine.io import write_text_atomic as write_text

REPO = Path(__file__).resolve().parents[1]
# the shipped configs name hub ids; offline, our copies are read through the mirror mechanism (README, "Data")
if (REPO.parent / "shared" / "data").is_dir():
    os.environ.setdefault("UNLEARN_DATA_MIRROR", str(REPO.parent / "shared" / "data"))
DATA = Path(os.environ.get("UNLEARN_DATA_MIRROR", REPO.parent / "shared" / "data"))
CIFAR, TOFU = DATA / "cifar10", DATA / "tofu"
DEMO, TOFU_CONFIG, TEXT_CONFIG = (REPO / "configs" / f"{n}.yaml" for n in ("demo", "tofu", "text"))
# image-classifier benchmarks' --quick: 100 images per class (80 train + 20 validation), 100 test per class
VISION_QUICK = {"data.max_per_class": 100, "data.max_test_per_class": 100}
MiB, GiB = 2**20, 2**30


def __getattr__(name: str):  # the report's formatting imports matplotlib: loaded on first use
    if name in ("fmt", "md_table", "num"):
        from engine.eval import report

        return getattr(report, name)
    raise AttributeError(name)


# --- overrides ------------------------------------------------------------------------------------------


def ov(key: str, value) -> str:
    """One ``key=value`` override; the value as JSON, which the config loader parses as YAML (a superset)."""
    return f"{key}={json.dumps(value)}"


def dataset(spec: str | None) -> str:
    """--dataset: a local path made absolute (the runs do not depend on the working directory), a hub id as
    given, or by default the mirror's CIFAR-10."""
    if spec is None:
        return str(CIFAR)
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def vision_overrides(args, **extra) -> list[str]:
    """What every image-classifier benchmark starts configs/demo.yaml from: --dataset, no progress bars, one
    thread, --seed, --quick's sizes (VISION_QUICK), then ``extra`` (a value of None leaves the key out)."""
    values = {"data.dataset": dataset(args.dataset), "logging.progress": False, "overwrite": True,
              "backend.num_threads": 1, "seed": getattr(args, "seed", None)}  # fmt: skip
    values.update({**(VISION_QUICK if args.quick else {}), **extra})
    return [ov(k, v) for k, v in values.items() if v is not None]


def forget_overrides(scenario: str, fraction: float) -> list[str]:
    """``class``: every training example of the config's class; ``random``: a random ``fraction`` of them."""
    if scenario == "class":
        return ["forget.kind=class"]
    return ["forget.kind=random", ov("forget.fraction", fraction), "forget.label=null"]


def _method_table() -> dict[str, dict]:
    import yaml

    return yaml.safe_load(Path(__file__).with_name("methods.yaml").read_text())


METHODS = [*_method_table(), "scrub+r"]


def method_overrides(name: str) -> list[str]:
    """``method=NAME`` then benchmarks/methods.yaml's settings of it; ``scrub+r``: SCRUB's, rewound."""
    base = name.removesuffix("+r")
    rewind = ["method.rewind=true"] if name.endswith("+r") else []
    return [f"method={base}", *(ov(f"method.{k}", v) for k, v in _method_table()[base].items()), *rewind]


# --- the command line -----------------------------------------------------------------------------------


def parser(doc: str, quick: str, out: bool = True, runs: bool = False, vision: bool = False):
    """The arguments the benchmarks share: --out (required unless ``out`` is False), --quick (help
    ``quick``); ``runs`` (benchmarks that start `unlearn` runs): --set KEY=VALUE (``args.set``); ``vision``:
    --set, --dataset, --config (configs/demo.yaml) and --seed."""
    formatter = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=formatter)
    p.add_argument("--out", type=Path, required=out, help="output folder (results.json, results.md)")
    p.add_argument("--quick", action="store_true", help=quick)
    if runs or vision:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="extra config override, applied last to every run (repeatable)")  # fmt: skip
    if vision:
        p.add_argument("--dataset", help=f"local folder/file or hub id (default: {CIFAR})")
        p.add_argument("--config", type=Path, default=DEMO, help="base config (default: configs/demo.yaml)")
        p.add_argument("--seed", type=int, help="run seed (default: the config's)")
    return p


def fill(args, full: dict, quick: dict):
    """Every key of the size preset (``quick`` with --quick, else ``full``) not given on the command line."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(run) -> None:
    """``sys.exit(run())``; an engine error (a bad dataset, label, override) in one line, no traceback."""
    from engine.errors import EngineError

    try:
        code = run()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
    sys.exit(code if isinstance(code, int) else 0)


# --- where a result came from, and how it is written ----------------------------------------------------


def git_commit(repo: Path = REPO) -> str | None:
    """``git rev-parse --short HEAD`` of ``repo`` (with ``+dirty`` when tracked files changed), or None."""
    try:
        run = dict(cwd=repo, capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
        return head.stdout.strip() + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> str:
    """Platform, CPU count and the CPU cores this process may use (they differ under a cgroup/affinity)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    return f"{platform.platform()} ({cpu}), {os.cpu_count()} CPUs ({usable} usable)"


def command(argv: list[str] | None = None) -> str:
    """``python -m benchmarks.NAME ARGS``: how this benchmark was started."""
    main = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    try:
        name = "-m " + ".".join(main.relative_to(REPO).with_suffix("").parts)
    except (AttributeError, ValueError):
        name = str(main or "-m benchmarks.<name>")
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", name, *(shlex.quote(a) for a in args)])


def run_header(argv: list[str] | None = None) -> dict:
    """The facts every result starts with: command, commit, machine, date, versions."""
    import torch

    return {"command": command(argv), "commit": git_commit(), "machine": machine(),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def header_markdown(header: dict) -> list[str]:
    """The header as Markdown bullet lines."""
    h = {k: header.get(k) or "-" for k in ("command", "machine", "date", "python", "torch", "torch_threads")}
    commit = header.get("commit") or "unknown (not a git checkout)"
    versions = f"- Python {h['python']}, torch {h['torch']}, {h['torch_threads']} torch thread(s)"
    return [f"- Command: `{h['command']}`", f"- Commit: `{commit}`", f"- Machine: {h['machine']}",
            f"- Date: {h['date']}", versions]  # fmt: skip


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (strict: no NaN) to ``path`` atomically."""
    write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def write_results(out: Path, result: dict, markdown: str) -> str:
    """``out/results.json`` and ``out/results.md``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    write_text(out / "results.md", markdown if markdown.endswith("\n") else markdown + "\n")
    return markdown


def document(title: str, header: dict, lines: list[str], wall: float | None = None) -> str:
    """A results.md: ``# title``, the header's facts (and the wall time, in seconds), then ``lines``."""
    wall_time = [] if wall is None else [f"- Wall time: {wall:.1f} s"]
    return "\n".join([f"# {title}", "", *header_markdown(header), *wall_time, "", *lines])


def table(rows: list[dict], columns: list[tuple], right: int | None = None) -> list[str]:
    """A Markdown table, a line per row of ``rows``, a column per ``(heading, key, spec)``: the row's ``key``
    (``key(row)`` when it is a function; a row without the key: an empty cell) through ``fmt(value, spec)``,
    ``spec(value)`` when it is a function, or as it is when there is no spec. ``right``: the columns from this
    index on are right-aligned."""
    from engine.eval.report import fmt, md_table

    def cell(row: dict, key, spec=None):
        if not callable(key) and key not in row:
            return ""
        value = key(row) if callable(key) else row[key]
        return value if spec is None else spec(value) if callable(spec) else fmt(value, spec)

    lines = md_table([c[0] for c in columns], [[cell(r, *c[1:]) for c in columns] for r in rows])
    if right is not None:
        lines[1] = "|" + "---|" * right + "---:|" * (len(columns) - right)
    return lines


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def choose(p: argparse.ArgumentParser, spec: str | None, allowed, what: str) -> list[str]:
    """``spec``, a comma-separated subset of ``allowed`` (None: all of them), in its own order; anything else
    (an unknown name, nothing) is a command-line error that lists the choices."""
    chosen = list(allowed) if spec is None else [x.strip() for x in spec.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in allowed]
    if unknown or not chosen:
        p.error(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return chosen


def preset(quick: bool) -> str:
    """An image-classifier benchmark's size preset, in words."""
    return "--quick " + json.dumps(VISION_QUICK) if quick else "full (configs/demo.yaml sizes)"


def vision_settings(args, cfg, forget: dict, **more) -> dict:
    """What an image-classifier benchmark records of its setting: scenario, sizes, data, model, the
    Original's recipe, its forget set and --set."""
    return {"scenario": args.scenario, "quick": args.quick, "dataset": cfg.data.dataset,
            "max_per_class": cfg.data.max_per_class, "max_test_per_class": cfg.data.max_test_per_class,
            "forget": forget, "arch": cfg.model.arch, "width": cfg.model.width,
            "train": cfg.train.model_dump(mode="json"), "extra_overrides": args.set, **more}  # fmt: skip


def rounded(value, digits: int = 4) -> float | None:
    """A metric rounded for a results table; None when it is not a number."""
    from engine.eval.report import num

    x = num(value)
    return None if x is None else round(x, digits)


@contextmanager
def figure(path: Path, size: tuple[float, float]):
    """The axes of a figure (Agg, no pyplot) that is laid out and saved to ``path`` (PNG) after the block."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    yield fig.add_subplot()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)


def error_bars(rows: list[dict], keys, labels: dict, path: Path, title: str, width: float, numbers=False):
    """``path``: a bar per key in ``keys`` (percentages: errors, MIA) for each row, grouped by
    ``row["method"]`` (``labels`` names them); ``numbers``: each bar's value above it."""
    import numpy as np

    from engine.eval.report import fmt

    colours = dict(forget_error="tab:red", retain_error="tab:blue", test_error="tab:green", mia="tab:gray")
    xs, bar = np.arange(len(rows)), 0.8 / len(keys)
    with figure(path, (width, 4.5)) as ax:
        for i, key in enumerate(keys):
            ys = [np.nan if r[key] is None else r[key] for r in rows]
            offset = (i - (len(keys) - 1) / 2) * bar
            bars = ax.bar(xs + offset, ys, bar, color=colours[key], label=key.replace("_", " "))
            if numbers:
                ax.bar_label(bars, labels=[fmt(y, ".1f") for y in ys], fontsize=7, padding=1)
        ax.set_xticks(xs, [labels[r["method"]] for r in rows])
        ax.set_ylabel("error (%)" if "mia" not in keys else "%")
        ax.set_ylim(0, 118)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", ncol=len(keys))


class Run:
    """One image-classifier benchmark's run, on one torch thread: ``header`` (run_header), ``out`` (--out,
    absolute), ``log(msg)`` (stamped with the seconds since the start), ``finish``. Silences the progress bars
    `logging.progress=false` does not reach (datasets' on every data load, transformers' on every save)."""

    def __init__(self, args, argv: list[str] | None):
        import datasets
        import torch
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(1)
        self.t0, self.header = time.perf_counter(), run_header(argv)
        self.out = args.out.expanduser().resolve()
        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.seconds():6.1f}s] {msg}", flush=True)

    def finish(self, result: dict, markdown: str, *printed: str) -> dict:
        """Write ``result`` and ``markdown`` (write_results), then print ``printed`` and where they went."""
        write_results(self.out, result, markdown)
        print("\n" + "\n".join(printed))
        print(f"\nwall time {result['wall_seconds']:.1f} s; results in {self.out / 'results.md'}")
        return result
