"""Local execution: compute blocks in order, write them in a background thread.

The writer overlaps disk I/O with the next block's computation. At most one
block waits in the queue, so at most three blocks are alive at once (computing,
queued, being written) and memory stays bounded. A writer error stops the run
and is raised in the caller; Ctrl-C stops after the block in progress (twice: at once).
Blocks come from :func:`jacstream.run.blocks.checked_blocks`, the step the dask
executor shares; they go to any :class:`~jacstream.store.sink.Sink`.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import events
from .._memory import release_free_memory_above
from ..planning import Block, Plan
from ..store.sink import Sink
from .blocks import Computed, RunStats, checked_blocks
from .progress import BlockBar, say_interrupted

__all__ = ["RunStats", "run_local"]


class _Writer(threading.Thread):
    def __init__(self, store: Sink, plan: Plan, bar: BlockBar | None, stats: RunStats,
                 on_block: Callable[[Block], None] | None) -> None:
        super().__init__(name="jacstream-writer", daemon=True)
        self.q: queue.Queue[tuple[Block, np.ndarray] | None] = queue.Queue(maxsize=1)
        self.store, self.plan, self.bar, self.stats = store, plan, bar, stats
        self.on_block = on_block
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain: after an error nothing more is written
            block, data = item
            t0 = time.perf_counter()
            try:
                self.store.write_block(self.plan, block, data)
                self.stats.write_seconds += time.perf_counter() - t0
                if self.bar is not None:
                    self.bar.advance(block)
                if self.on_block is not None:
                    self.on_block(block)
            except BaseException as e:  # surfaced in the caller, never lost in this thread
                self.error = e

    def put(self, item: tuple[Block, np.ndarray]) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self.q.put(None)
        self.join()
        if self.bar is not None:
            self.bar.close()


def run_local(plan: Plan, store: Sink, inputs: Any, fn: Any, *, progress: bool = True,
              on_nonfinite: str = "raise", on_block: Callable[[Block], None] | None = None,
              t_out: int | None = None, precomputed: dict[int, Computed] | None = None,
              trim_above: int | None = None) -> RunStats:
    """Carry out ``plan`` block by block, skipping blocks the store records as done.

    ``store`` is any sink (a :class:`~jacstream.store.sink.NullSink` drops the
    blocks). ``precomputed`` maps block indices to results already computed (by
    the strategy trial): they are checked and written, not computed again.
    ``trim_above``: resident bytes past which the allocator's free memory is given
    back after a block (blocks that grow, as in causal runs, fragment the heap).
    """
    stats = RunStats()
    t_start = time.perf_counter()
    done = store.done_blocks()
    pending = [b for b in plan.blocks if b.index not in done]
    stats.skipped_blocks = plan.n_blocks - len(pending)
    writer = _Writer(store, plan, None, stats, on_block)
    writer.start()
    try:
        with events.phase("blocks", f"{len(pending)} of {plan.n_blocks} blocks"), \
                _CtrlC() as ctrl_c:
            # Made once the phase has begun: its line comes before the bar.
            writer.bar = BlockBar(plan, done, "jacobian", progress, fn, precomputed or ())
            ctrl_c.check()
            for item in checked_blocks(fn, plan, pending, lambda b: _read(inputs, b),
                                       t_out=t_out, on_nonfinite=on_nonfinite,
                                       precomputed=precomputed):
                if item.precomputed:
                    stats.precomputed_blocks.append(item.block.index)
                stats.compute_seconds += item.seconds
                if item.nonfinite is not None:
                    stats.nonfinite_blocks.append(item.block.index)
                    warnings.warn(item.nonfinite, RuntimeWarning, stacklevel=3)
                stats.computed_blocks.append(item.block.index)
                writer.put((item.block, item.data))
                del item
                # Blocks that grow (causal runs) fragment the heap: past the plan's
                # estimate, give the free part back.
                release_free_memory_above(trim_above)
                ctrl_c.check()
    except KeyboardInterrupt as e:
        writer.close()
        say_interrupted(e, f"{len(store.done_blocks())} of {plan.n_blocks} blocks are safely in "
                        f"{str(store.path)!r}. Call jacstream.jacobian() again with the same "
                        "arguments to resume.")
        raise
    except BaseException:
        writer.close()
        raise
    writer.close()
    if writer.error is not None:
        raise writer.error
    stats.wall_seconds = time.perf_counter() - t_start
    return stats


def _read(inputs: Any, block: Block) -> np.ndarray:
    e0, e1 = block.examples
    return np.asarray(inputs[e0:e1])


class _CtrlC:
    """Inside ``with``: Ctrl-C (SIGINT) stops the run between blocks.

    The first Ctrl-C only sets a flag that the block loop checks, so the block
    in progress finishes and is kept; a second one is Python's default
    (KeyboardInterrupt at once). Installed only in the main thread and only
    over Python's default handler (a caller's own is kept); the default is
    back when the ``with`` block ends.
    """

    def __enter__(self) -> _CtrlC:
        self.hit = False
        self.installed = (threading.current_thread() is threading.main_thread()
                          and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if self.installed:
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handler(self, signum: int, frame: Any) -> None:
        self.restore()   # a second Ctrl-C: Python's default, immediately
        self.hit = True

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.installed = False
