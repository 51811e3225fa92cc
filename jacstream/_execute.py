"""Local execution: compute blocks in order, write them in a background thread.

The writer overlaps disk I/O with the next block's computation. At most one
block waits in the queue, so at most three blocks are alive at once (computing,
queued, being written) and memory stays bounded. A writer error stops the run
and is raised in the caller; Ctrl-C stops after the block in progress (twice: at once).
"""

from __future__ import annotations

import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ._memory import release_free_memory_above
from ._plan import Block, Plan
from ._store import JobStore
from .errors import JacstreamError, ModelError, NonFiniteError

__all__ = ["RunStats", "run_local"]

# compute(x, out_steps, in_len) for a reverse-mode block; forward-mode blocks
# also pass their input steps: compute(x, out_steps, in_len, (t0, t1)).
ComputeFn = Callable[..., tuple[np.ndarray, tuple[int, ...], int]]


@dataclass
class RunStats:
    computed_blocks: list[int] = field(default_factory=list)
    skipped_blocks: int = 0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    wall_seconds: float = 0.0
    nonfinite_blocks: list[int] = field(default_factory=list)
    precomputed_blocks: list[int] = field(default_factory=list)  # by the strategy trial


class _Writer(threading.Thread):
    def __init__(self, store: JobStore, plan: Plan, bar: Any, stats: RunStats,
                 on_block: Callable[[Block], None] | None, write: bool = True) -> None:
        super().__init__(name="jacstream-writer", daemon=True)
        self.q: queue.Queue[tuple[Block, np.ndarray] | None] = queue.Queue(maxsize=1)
        self.store, self.plan, self.bar, self.stats = store, plan, bar, stats
        self.on_block = on_block
        self.write = write
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
                if self.write:
                    self.store.write_block(self.plan, block, data)
                self.stats.write_seconds += time.perf_counter() - t0
                self.bar.update(1)
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


def run_local(plan: Plan, store: JobStore, inputs: Any, compute: ComputeFn, *,
              progress: bool = True, on_nonfinite: str = "raise",
              on_block: Callable[[Block], None] | None = None,
              t_out: int | None = None, write: bool = True,
              precomputed: dict[int, tuple[np.ndarray, tuple[int, ...], int]] | None = None,
              trim_above: int | None = None) -> RunStats:
    """Carry out ``plan`` block by block, skipping blocks the store records as done.

    ``write=False`` is a null sink for benchmarks: blocks are computed and dropped.
    ``precomputed`` maps block indices to results already computed (by the
    strategy trial): they are checked and written, not computed again.
    ``trim_above``: resident bytes past which the allocator's free memory is given
    back after a block (blocks that grow, as in causal runs, fragment the heap).
    """
    precomputed = dict(precomputed or {})
    stats = RunStats()
    t_start = time.perf_counter()
    done = store.done_blocks()
    pending = [b for b in plan.blocks if b.index not in done]
    stats.skipped_blocks = plan.n_blocks - len(pending)
    out_steps = np.asarray(plan.out_steps, dtype=np.int32)
    bar = tqdm(total=plan.n_blocks, initial=plan.n_blocks - len(pending), unit="block",
               desc="jacobian", disable=None if progress else True, dynamic_ncols=True,
               file=sys.stderr)
    writer = _Writer(store, plan, bar, stats, on_block, write)
    writer.start()
    try:
        with _CtrlC() as ctrl_c:
            for block in pending:
                ctrl_c.check()
                e0, e1 = block.examples
                x = np.asarray(inputs[e0:e1])
                if block.index in precomputed:
                    data, yshape, fed = precomputed.pop(block.index)
                    stats.precomputed_blocks.append(block.index)
                else:
                    t0 = time.perf_counter()
                    data, yshape, fed = compute_block(compute, plan, block, x, out_steps)
                    stats.compute_seconds += time.perf_counter() - t0
                _check_shapes(plan, block, data, yshape, fed, t_out)
                if on_nonfinite != "ignore" and not np.isfinite(data).all():
                    _report_nonfinite(plan, block, data, on_nonfinite, stats, x)
                stats.computed_blocks.append(block.index)
                writer.put((block, data))
                del data
                # Blocks that grow (causal runs) fragment the heap: past the plan's estimate,
                # give the free part back.
                release_free_memory_above(trim_above)
            ctrl_c.check()
    except KeyboardInterrupt:
        writer.close()
        bar.close()
        n_done = len(store.done_blocks())
        print(f"\njacstream: interrupted; {n_done} of {plan.n_blocks} blocks are safely in "
              f"{str(store.path)!r}. Call jacstream.jacobian() again with the same arguments "
              "to resume.", file=sys.stderr)
        raise
    except BaseException:
        writer.close()
        bar.close()
        raise
    writer.close()
    bar.close()
    if writer.error is not None:
        raise writer.error
    stats.wall_seconds = time.perf_counter() - t_start
    return stats


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


def compute_block(compute: ComputeFn, plan: Plan, block: Block, x: np.ndarray,
                  out_steps: np.ndarray, where: str = "",
                  ) -> tuple[np.ndarray, tuple[int, ...], int]:
    """``compute`` one block of ``plan`` on its inputs ``x``; name the block in any error.

    A :class:`JacstreamError` is already in the user's terms and passes as it is;
    any other error (TensorFlow's) gets a note saying which block failed, and
    ``where`` (e.g. the dask worker) it ran.
    """
    (e0, e1), (p0, p1) = block.examples, block.positions
    try:
        return compute(x, out_steps[p0:p1], block.in_len, *_extra_args(block))
    except JacstreamError:
        raise
    except Exception as e:
        if hasattr(e, "add_note"):
            e.add_note(f"jacstream: while computing block {block.index} of {plan.n_blocks}"
                       f"{where}: examples {e0}..{e1 - 1}, output steps "
                       f"{plan.out_steps[p0]}..{plan.out_steps[p1 - 1]}, input length "
                       f"{block.in_len}, input steps {block.columns}, inputs {x.shape}")
        raise


def _extra_args(block: Block) -> tuple[Any, ...]:
    """Arguments a block passes to the compute function after ``in_len``."""
    return () if block.in_steps is None else (block.in_steps,)


def _check_shapes(plan: Plan, block: Block, data: np.ndarray, yshape: tuple[int, ...],
                  fed: int, t_out: int | None) -> None:
    e = block.examples[1] - block.examples[0]
    k = block.positions[1] - block.positions[0]
    want_t = fed if fed < plan.t_in else (t_out or plan.t_out)
    if len(yshape) != 3 or yshape[0] != e or yshape[1] != want_t or yshape[2] != plan.f_out:
        raise ModelError(
            f"on block {block.index} the model returned outputs of shape {tuple(yshape)} for "
            f"inputs of shape ({e}, {fed}, {plan.f_in}); expected "
            f"({e}, {want_t}, {plan.f_out}). A model whose time axis changes with the input "
            "length, or a Keras TimeDistributed layer on a dynamic time axis (which can return "
            "a time axis as long as the batch), gives this. Build the model with a static "
            "input length, or pass causal=False.")
    c0, c1 = block.columns
    want = (e, k, plan.f_out, c1 - c0, plan.f_in)
    if data.shape != want:
        raise ModelError(f"block {block.index}: the Jacobian has shape {data.shape}, expected "
                         f"{want}.")


def _report_nonfinite(plan: Plan, block: Block, data: np.ndarray, mode: str,
                      stats: RunStats, x: np.ndarray) -> None:
    bad = ~np.isfinite(data)
    ex, pos = np.nonzero(bad.any(axis=(2, 3, 4)))
    steps = sorted({plan.out_steps[block.positions[0] + int(p)] for p in pos})
    exs = sorted({block.examples[0] + int(i) for i in ex})
    bad_x = sorted({block.examples[0] + int(i)
                    for i in np.nonzero(~np.isfinite(x).all(axis=(1, 2)))[0]})
    cause = (f"The inputs of examples {bad_x[:10]}{'...' if len(bad_x) > 10 else ''} hold "
             "NaN/Inf themselves: clean or mask them." if bad_x else
             "The model's outputs or gradients overflow or are undefined for these inputs "
             "(e.g. sqrt or log at 0, large exponents): check their scale.")
    msg = (f"block {block.index} holds {int(bad.sum())} NaN/Inf values: examples {exs[:10]}"
           f"{'...' if len(exs) > 10 else ''}, output steps {steps[:10]}"
           f"{'...' if len(steps) > 10 else ''}. {cause} Blocks finished before it are safely "
           "stored. To store NaN/Inf and go on, call again with on_nonfinite='warn' (it "
           "resumes) or 'ignore'.")
    if mode == "raise":
        raise NonFiniteError(msg)
    stats.nonfinite_blocks.append(block.index)
    import warnings

    warnings.warn(msg, RuntimeWarning, stacklevel=3)
