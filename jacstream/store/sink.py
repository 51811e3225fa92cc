"""Where computed blocks go: the one protocol every executor writes to.

A sink records which blocks it holds (``done_blocks``) and takes one block at
a time (``write_block``). :class:`~jacstream.store.jobstore.JobStore` is the
zarr store on disk; :class:`NullSink` drops every block (benchmarks: the
compute cost alone); a streaming reduction (:mod:`jacstream.analysis.streaming`)
reduces each block as it comes and keeps only the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..planning import Block, Plan

__all__ = ["NullSink", "Sink"]


class Sink(Protocol):
    """What the executors (:mod:`jacstream.run`) need of the place blocks go."""

    @property
    def path(self) -> Path: ...

    def done_blocks(self) -> set[int]:
        """Indices of the blocks already held (skipped by a run)."""
        ...

    def write_block(self, plan: Plan, block: Block, data: np.ndarray) -> None:
        """Take block ``block`` of ``plan``; once this returns, it counts as done."""
        ...


class NullSink:
    """A sink that drops every block: a run then measures computing alone.

    Examples
    --------
    >>> NullSink().done_blocks()
    set()
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else Path("<null>")
        self.written = 0

    def done_blocks(self) -> set[int]:
        return set()

    def write_block(self, plan: Plan, block: Block, data: np.ndarray) -> None:
        self.written += 1
