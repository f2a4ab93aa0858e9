"""What the engine does when things go wrong: every fault and bad request of issue 7, on CPU.

    python benchmarks/faults.py --out DIR [--quick] [--only NAME ...]

Each case runs the real command line (`python -m engine.cli run|train ...`; two ranks under torchrun
over gloo for the distributed cases) on a tiny Llama and real TOFU rows, or on a tiny ResNet and a tiny
real CIFAR-10 (image-classifier runs, `unlearn train`, bad requests), injects its fault with ``UNLEARN_FAULT`` (engine/faults.py) or damages files by hand, and
checks what happened: exit status, message, what is left on disk, and, for every run that resumes,
that it ends with exactly the weights of an uninterrupted run of the same backend (torch.equal on
every tensor). Writes DIR/results.json ``{"cases": [{"name", "expected", "observed", "passed",
"seconds"}]}`` and the table DIR/results.md. ``--quick``: 10 authors, 2 epochs (about 9 minutes on
2 cores); the full size: 20 authors, 3 epochs (image-classifier runs: 3 epochs). The harness (the cases) is tests/faults.py; tests/integration/test_faults.py runs the same cases.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.faults
    from _common import REPO, header_markdown, md_table, run_header, write_json, write_text
except ImportError:
    from benchmarks._common import REPO, header_markdown, md_table, run_header, write_json, write_text

sys.path.insert(0, str(REPO))
from tests.faults import CASES, SIDE, TWO_RANKS, Context, run_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help="the smallest size (about 9 minutes)")
    parser.add_argument("--only", nargs="*", help="run only the cases whose name contains one of these")
    args = parser.parse_args(argv)
    header = run_header(argv)
    ctx = Context(args.out / "work", quick=args.quick)
    names = [n for n, _, _ in CASES if not args.only or any(o in n for o in args.only)]

    def one(name: str) -> dict:
        r = run_case(ctx, name)
        print(
            f"[{'pass' if r['passed'] else 'FAIL'}] {name} ({r['seconds']:.0f} s): {r['observed']}",
            flush=True,
        )
        return r

    with ThreadPoolExecutor(1) as pool:
        beside = pool.submit(lambda: {n: one(n) for n in names if n in SIDE})
        done = {n: one(n) for n in names if n not in SIDE | TWO_RANKS}
        done.update(beside.result())
    done.update({n: one(n) for n in names if n in TWO_RANKS})
    results = [done[name] for name in names]
    write_json(args.out / "results.json", {**header, "quick": args.quick, "cases": results})
    rows = [[r["name"], r["expected"], r["observed"], "yes" if r["passed"] else "**NO**", f"{r['seconds']:.0f}"]
            for r in results]  # fmt: skip
    passed = sum(r["passed"] for r in results)
    lines = [*header_markdown(header), f"{passed} of {len(results)} cases passed.", "",
             *md_table(["case", "expected", "observed", "passed", "s"], rows)]  # fmt: skip
    write_text(args.out / "results.md", "\n".join(lines) + "\n")
    print(f"{passed}/{len(results)} passed; {args.out / 'results.md'}")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
