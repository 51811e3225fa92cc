"""Where the time of one ``jacstream.jacobian`` call goes, phase by phase.

A development tool beside the runner: the runner times whole calls, this
splits one call (in this process) into its phases by listening to
:mod:`jacstream.events`. Run from a checkout; it times the jacstream of the
current directory::

    python -m benchmarks.phases --T 1000 --causal auto --repeat 3

Phases (seconds, summed over calls): ``checks`` (the model checks: eager
forward passes, batch independence, differentiability), ``detect_causal``
(``causal="auto"`` only), ``build`` (tracing a strategy's block function and
its first calls, per strategy built), ``probes`` (memory probes), ``trial``
(the strategy trial's block(s)), ``blocks`` (the run's own blocks) and
``total``. Each repeat runs in a new process, so every trace is cold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

__all__ = ["main"]


def _one(T: int, causal: Any, strategy: str, budget: str) -> dict[str, float]:
    sys.path.insert(0, os.getcwd())
    from benchmarks.workloads import Workload

    w = Workload("lstm-h32", "lstm", T=T)
    model, x = w.build_model(), w.make_inputs()
    import jacstream
    from jacstream import events

    times: dict[str, float] = {}

    def add(phase: str, seconds: float) -> None:
        times[phase] = times.get(phase, 0.0) + seconds

    with tempfile.TemporaryDirectory() as d, events.listen(add):
        t = time.perf_counter()
        J = jacstream.jacobian(model, x, os.path.join(d, "j.zarr"), progress=False,
                               memory_budget=budget, causal=causal, strategy=strategy)
        times["total"] = time.perf_counter() - t
    times["n_blocks"] = J.plan.n_blocks
    times["strategy"] = J.plan.strategy  # type: ignore[assignment]
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.phases", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=1000, help="sequence length (reference LSTM)")
    p.add_argument("--causal", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--strategy", default="auto")
    p.add_argument("--memory-budget", default="1GiB")
    p.add_argument("--repeat", type=int, default=1, help="processes to run, one after another")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    causal = {"auto": "auto", "true": True, "false": False}[args.causal]
    if args.child:
        print(json.dumps(_one(args.T, causal, args.strategy, args.memory_budget)))
        return
    base = [sys.executable, "-m", "benchmarks.phases", "--child", "--T", str(args.T),
            "--causal", args.causal, "--strategy", args.strategy,
            "--memory-budget", args.memory_budget]
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run(base, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"T={args.T} causal={args.causal} {r.pop('strategy')}, {r.pop('n_blocks')} blocks: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in r.items()), flush=True)
    if len(runs) > 1:
        import statistics

        keys = [k for k in runs[0] if all(k in r for r in runs)]
        print("median: " + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f} s"
                                     for k in keys))


if __name__ == "__main__":
    main()
