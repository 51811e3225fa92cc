"""A streaming reduction: a sink that reduces each block as it is computed.

``jacstream.jacobian(..., reduce=...)`` gives the run (:mod:`jacstream.run`)
a :class:`ReductionSink` instead of a store: every block goes through the
accumulator and is dropped, and only the reduced result is kept, saved at the
path as a small zarr store (:mod:`jacstream.store.reduced`). A later call for
the same job and reduction loads it instead of computing it again. Nothing
here computes: the run does. No TensorFlow here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, NotAStoreError, StoreMismatchError
from ..planning import Block, Plan
from ..store import rules
from ..store.jobstore import describe_differences
from ..store.reduced import load_reduced, save_reduced
from .reductions import Reduction
from .source import Accumulator, Layout, update_cropped

__all__ = ["ReductionSink"]


class ReductionSink:
    """The sink of a streaming reduction of one job (see the module docstring).

    Call :meth:`start` with the job's plan and identity first: it returns the
    saved result when this very job was reduced before, else None (then the run
    writes its blocks here, and :meth:`finish` returns and saves the result).
    """

    def __init__(self, reduction: Reduction, path: Path | None, overwrite: bool) -> None:
        self.reduction, self.overwrite = reduction, overwrite
        self._path = path
        self.acc: Accumulator | None = None
        self.meta: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else Path("<memory>")

    def start(self, plan: Plan, job: dict[str, Any]) -> Any:
        """Check the plan and the path; the saved result of the same job, or None."""
        acc = self.reduction.build(Layout(plan.shape, np.asarray(plan.out_steps), plan.causal))
        if acc.align > 1 and plan.block_size % acc.align:
            raise InputError(
                f"reduce={self.reduction.name!r} with a max over windows of {acc.align} output "
                f"steps needs block_size to be a multiple of {acc.align} (it is "
                f"{plan.block_size}). Pass block_size, or use reduce='sum'.")
        self.acc = acc
        self.meta = {**{k: v for k, v in job.items() if k != "model_rewrites"},
                     "reduction": self.reduction.to_dict(), "plan": plan.to_dict()}
        if self._path is None or rules.is_new(self._path):
            return None
        try:
            old = load_reduced(self._path)
        except NotAStoreError:
            old = None
        if old is not None and not self.overwrite:
            stored = json.loads(old.attrs["jacstream"])
            diffs = describe_differences(stored, self.meta)
            if stored.get("reduction") != self.meta["reduction"]:
                diffs.append(f"reduction: store has {stored.get('reduction')}, this call has "
                             f"{self.meta['reduction']}")
            if not diffs:
                return old
            raise StoreMismatchError(
                f"{str(self._path)!r} holds a reduced result of another job:\n  - "
                + "\n  - ".join(diffs) + "\nPass overwrite=True to replace it, or choose "
                "another path.")
        rules.refuse_existing(self._path, self.overwrite)
        return None

    def done_blocks(self) -> set[int]:
        return set()

    def write_block(self, plan: Plan, block: Block, data: np.ndarray) -> None:
        assert self.acc is not None, "start() first"
        update_cropped(self.acc, block.examples, block.positions, 0, data)

    def finish(self, run: dict[str, Any]) -> Any:
        """The reduced result, with the job and ``run`` in ``attrs["jacstream"]``; saved."""
        assert self.acc is not None, "start() first"
        result = self.acc.result()
        result.attrs["jacstream"] = json.dumps({**self.meta, "run": run})
        if self._path is not None:
            save_reduced(result, self._path)
        return result
