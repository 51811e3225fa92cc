"""Command line: ``python -m benchmarks --suite quick --output bench-results/quick``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

GiB = 2**30


def parse_bytes(text: str) -> int:
    """``"16GiB"`` -> bytes.

    >>> parse_bytes("16GiB") == 16 * 2**30, parse_bytes("512 MiB"), parse_bytes("1000")
    (True, 536870912, 1000)
    """
    from jacstream.errors import BudgetError
    from jacstream.planning import parse_memory

    try:
        n = parse_memory(text, name="size")
    except BudgetError:
        n = None
    if n is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 16GiB or 512MiB, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    from .suites import SUITES

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=(
        "Benchmark jacstream against the usual ways of computing per-example Jacobians; "
        "each case in its own process with a memory cap and a timeout."))
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--output", type=Path, default=None,
                   help="folder for results.json, report.md, PNGs and logs "
                        "(default: bench-results/SUITE)")
    p.add_argument("--only", action="append", default=[], metavar="SUBSTR",
                   help="run only cases whose id (WORKLOAD-T/METHOD, e.g. lstm-h32-T300/tf-eager)"
                        " contains one of these substrings; repeat or separate by commas")
    p.add_argument("--mem-cap", type=parse_bytes, default=16 * GiB,
                   help="kill a case whose RSS passes this (default 16GiB)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per case unless the suite sets more (default 600)")
    p.add_argument("--memory-budget", default="1GiB",
                   help="jacstream's memory_budget in every jacstream case (default 1GiB; "
                        "'default' for the library's own default)")
    p.add_argument("--torch-python", default=None,
                   help="interpreter with torch for the PyTorch cases (default: this one if it "
                        "has torch, else those cases are recorded as unavailable)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads in the PyTorch cases (default: torch's own)")
    p.add_argument("--jax-python", default=None,
                   help="interpreter with jax and numpy (and keras, for keras-jax-jacrev) for "
                        "the JAX cases (default: this one if it has jax, else those cases are "
                        "recorded as unavailable)")
    p.add_argument("--matmul-seconds", type=float, default=2.0,
                   help="seconds of float32 1024x1024 matmuls measuring the machine's GFLOP/s "
                        "at the start of the run (default 2; 0 skips it)")
    p.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: system temp)")
    p.add_argument("--readme", type=Path, default=None, metavar="PATH",
                   help="also put the targets, the reference model's table and its plot into "
                        "this Markdown file (between bench:results markers), e.g. "
                        "benchmarks/README.md")
    p.add_argument("--list", action="store_true", help="list the suite's cases and exit")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite report.md and the PNGs from OUTPUT/results.json")
    p.add_argument("--exclude", action="append", default=[], metavar="SUBSTR",
                   help="leave out cases whose id contains SUBSTR (repeatable, or comma-separated)")
    p.add_argument("--merge", action="append", type=Path, default=[], metavar="DIR",
                   help="with --report-only: report the runs in these output folders as one "
                        "(in order; a later run's case replaces the same case of an earlier "
                        "one), written to --output")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="exit 1 unless every case ran and was exact (default: on for the quick "
                        "and smoke suites)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .report import check_exact, update_readme, write_report
    from .runner import Settings, run_cases
    from .suites import SUITES

    output = args.output or Path("bench-results") / args.suite
    if args.report_only:
        source: Any = output / "results.json"
        if args.merge:
            import json

            from .report import merge_results

            source = merge_results([json.loads((d / "results.json").read_text())
                                    for d in args.merge])
            output.mkdir(parents=True, exist_ok=True)
            (output / "results.json").write_text(json.dumps(source, indent=1, default=str))
        for path in write_report(source, output):
            print(path)
        if args.readme:
            print(update_readme(source, output, args.readme))
        return 0
    filters = [f for item in args.only for f in item.split(",") if f]
    excluded = [f for item in args.exclude for f in item.split(",") if f]
    cases = [c for c in SUITES[args.suite]() if (not filters or any(f in c.id for f in filters))
             and not any(f in c.id for f in excluded)]
    if args.list:
        for c in cases:
            notes = ([f"timeout {c.timeout:.0f} s"] if c.timeout else []) + \
                ([f"memory_budget {c.memory_budget}"] if c.memory_budget else [])
            print(c.id + (f"  ({', '.join(notes)})" if notes else ""))
        return 0
    if not cases:
        print(f"no case of suite {args.suite!r} matches --only {filters}", file=sys.stderr)
        return 2
    budget = None if args.memory_budget == "default" else args.memory_budget
    settings = Settings(output=output, mem_cap=args.mem_cap, timeout=args.timeout,
                        torch_python=args.torch_python,
                        torch_threads=args.torch_threads, jax_python=args.jax_python,
                        matmul_seconds=args.matmul_seconds, memory_budget=budget, tmp=args.tmp,
                        suite=args.suite)
    t0 = time.perf_counter()
    results = run_cases(cases, settings)
    paths = write_report(results, output)
    if args.readme:
        paths.append(update_readme(results, output, args.readme))
    print(f"{len(cases)} cases in {time.perf_counter() - t0:.0f} s; wrote "
          f"{output / 'results.json'}, " + ", ".join(str(p) for p in paths))
    check = args.check if args.check is not None else args.suite in ("quick", "smoke")
    if check:
        bad = check_exact(results)
        for line in bad:
            print(f"FAILED {line}", file=sys.stderr)
        if bad:
            return 1
        print(f"all {len(results['cases'])} cases ran and are exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
