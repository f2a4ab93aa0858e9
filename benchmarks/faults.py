"""What the engine does when things go wrong: every fault and bad request of issue 7, on CPU.

    python -m benchmarks.faults --out DIR [--quick] [--only NAME ...]

Each case runs the real command line (`python -m engine.cli run|train ...`; two ranks under torchrun over gloo
for the distributed cases) on a tiny Llama and real TOFU rows, or on a tiny ResNet and a tiny real CIFAR-10
(image-classifier runs, `unlearn train`, bad requests), injects its fault with ``UNLEARN_FAULT``
(engine/faults.py) or damages files by hand, and checks what happened: exit status, message, what is left on
disk, and, for every run that resumes, that it ends with exactly the weights of an uninterrupted run of the
same backend (torch.equal on every tensor). Writes DIR/results.json ``{"cases": [{"name", "expected",
"observed", "passed", "seconds"}]}`` and the table DIR/results.md. ``--quick``: 10 authors, 2 epochs (about 9
minutes on 2 cores); the full size: 20 authors, 3 epochs (image-classifier runs: 3 epochs). The cases are
engine/testing.py's; tests/integration/test_faults.py runs the same cases.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from benchmarks import kit
from engine.testing import CASES, SIDE, TWO_RANKS, Context, run_case

COLUMNS = [("case", "name"), ("expected", "expected"), ("observed", "observed"),
           ("passed", lambda r: "yes" if r["passed"] else "**NO**"), ("s", "seconds", ".0f")]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = kit.parser(__doc__, "the smallest size (about 9 minutes)")
    parser.add_argument("--only", nargs="*", help="run only the cases whose name contains one of these")
    args = parser.parse_args(argv)
    header = kit.run_header(argv)
    ctx = Context(args.out / "work", quick=args.quick)
    names = [n for n, _, _ in CASES if not args.only or any(o in n for o in args.only)]

    def one(name: str) -> dict:
        r = run_case(ctx, name)
        verdict = "pass" if r["passed"] else "FAIL"
        print(f"[{verdict}] {name} ({r['seconds']:.0f} s): {r['observed']}", flush=True)
        return r

    with ThreadPoolExecutor(1) as pool:
        beside = pool.submit(lambda: {n: one(n) for n in names if n in SIDE})
        done = {n: one(n) for n in names if n not in SIDE | TWO_RANKS}
        done.update(beside.result())
    done.update({n: one(n) for n in names if n in TWO_RANKS})
    results = [done[name] for name in names]
    passed = sum(r["passed"] for r in results)
    lines = [f"{passed} of {len(results)} cases passed.", "", *kit.table(results, COLUMNS)]
    kit.write_results(args.out, {**header, "quick": args.quick, "cases": results},
                      kit.document("Faults and bad requests", header, lines))  # fmt: skip
    print(f"{passed}/{len(results)} passed; {args.out / 'results.md'}")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    kit.main(main)
