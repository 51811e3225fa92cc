"""The record of one run, appended to the store's metadata (``attrs["runs"]``)."""

from __future__ import annotations

import time
from typing import Any

from .._version import __version__
from ..planning import Plan

__all__ = ["run_record"]


def run_record(stats: Any, device: str, plan: Plan, traces: int, t_call: float,
               peak_increase: int, fn: Any = None) -> dict[str, Any]:
    """What a run did: blocks, seconds, traces, memory (and the dask workers' share)."""
    run = {
        "version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device,
        "blocks_computed": len(stats.computed_blocks),
        "blocks_skipped": stats.skipped_blocks,
        "wall_seconds": round(time.perf_counter() - t_call, 3),
        "compute_seconds": round(stats.compute_seconds, 3),
        "write_seconds": round(stats.write_seconds, 3),
        "traces": traces,
        "strategy": plan.strategy,
        "peak_rss_increase": max(peak_increase, 0),
        "nonfinite_blocks": stats.nonfinite_blocks,
        "blocks_from_trial": stats.precomputed_blocks,
    }
    if hasattr(stats, "run_info"):
        run.update(stats.run_info())   # executor, scheduler, traces per worker
    elif fn is not None and hasattr(fn, "run_info"):
        run.update(fn.run_info())      # what the block function counted (a local run)
    return run
