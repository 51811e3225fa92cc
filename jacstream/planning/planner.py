"""The planner: shapes and options in, a :class:`~jacstream.planning.blocks.Plan` out.

Pure Python: no TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import BudgetError, InputError
from .blocks import CostModel, Plan, forward_peak
from .steps import inputs_needed, normalize_out_steps
from .strategies import REGISTRY, STRATEGIES
from .units import format_bytes, itemsize, parse_memory

__all__ = ["make_plan"]

# Chunks smaller than this make too many files; the in-step chunk is widened
# to a multiple of the block size until a chunk reaches it.
MIN_CHUNK_BYTES = 128 * 1024
# Plan to this fraction of the budget: the cost model is fitted on probe blocks of
# at most 512 steps and extrapolated (to T=10000 and beyond); the rest of the
# budget covers what a probe cannot see (the blocks in flight, allocator slack).
BUDGET_HEADROOM = 0.8


def make_plan(input_shape: Sequence[int], output_shape: Sequence[int], *,
              out_steps: Any = None, block_size: int | None = None,
              examples_per_block: int | None = None, memory_budget: int | str | None = None,
              causal: bool = False, strategy: str = "pfor", dtype: str = "float32",
              cost: CostModel | None = None, in_chunk: int | None = None) -> Plan:
    """Plan a Jacobian job from shapes alone.

    Parameters
    ----------
    input_shape, output_shape : sequence of int
        ``(batch, T_in, F_in)`` and ``(batch, T_out, F_out)``.
    out_steps : None, int, slice or sequence of int
        Output steps to differentiate (see :func:`normalize_out_steps`).
    block_size : int, optional
        Output steps per block (input steps per block for ``strategy="forward"``).
        Chosen from the memory budget when omitted.
    examples_per_block : int, optional
        Examples per block. All of them when omitted, unless the budget needs fewer.
    memory_budget : int or str, optional
        Bound on the working memory of one block (bytes or e.g. ``"1GiB"``).
    causal : bool
        Whether output step t depends only on inputs ``<= t`` (enables truncation).
    strategy : str
        Name of the differentiation strategy. ``"forward"`` plans blocks of
        input steps (``axis="in"``); the others plan blocks of output steps.
    cost : CostModel, optional
        Memory model of one block; a conservative default when omitted.
    in_chunk : int, optional
        Input steps per zarr chunk. Default: the block size, widened by whole
        blocks until a chunk holds 128 KiB (fewer, larger files). In forward
        mode it must equal the block size (each block writes whole chunks); the
        output-step chunk is then widened instead.

    Returns
    -------
    Plan

    Examples
    --------
    >>> p = make_plan((10, 1000, 1), (10, 1000, 1), memory_budget="1GiB", causal=True)
    >>> p.shape
    (10, 1000, 1, 1000, 1)
    >>> p.n_blocks > 1
    True
    """
    batch, t_in, f_in = _shape3(input_shape, "input")
    batch_out, t_out, f_out = _shape3(output_shape, "output")
    if batch_out != batch:
        raise InputError(f"the output batch size {batch_out} differs from the input's {batch}.")
    steps = normalize_out_steps(out_steps, t_out)
    if causal and t_in != t_out:
        raise InputError(f"causal=True needs as many output steps as input steps; the model maps "
                         f"{t_in} input steps to {t_out} output steps. Use causal=False.")
    budget = parse_memory(memory_budget)
    if strategy not in REGISTRY:
        raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    for name, v in (("block_size", block_size), ("examples_per_block", examples_per_block),
                    ("in_chunk", in_chunk)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"{name} must be a positive int, got {v!r}.")
    cost = cost or CostModel()
    fit = _Fit(batch, t_in, f_in, f_out, steps, bool(causal), strategy, itemsize(dtype), cost,
               None if budget is None else int(budget * BUDGET_HEADROOM))
    e = min(examples_per_block or batch, batch)
    if block_size is not None:
        k = fit.check_block_size(block_size, e, budget)
    else:
        e, k = fit.choose(e, examples_per_block is None, budget)
    in_chunk, out_chunk = fit.chunking(k, e, in_chunk)
    return Plan(batch=batch, t_in=t_in, f_in=f_in, t_out=t_out, f_out=f_out, out_steps=steps,
                block_size=k, examples_per_block=e, in_chunk=in_chunk, causal=bool(causal),
                strategy=strategy, dtype=dtype, memory_budget=budget, cost=cost,
                estimated_peak=fit.peak(k, e), axis=fit.axis, out_chunk=out_chunk)


class _Fit:
    """Block sizes of one job against its memory target (``None``: no budget)."""

    def __init__(self, batch: int, t_in: int, f_in: int, f_out: int, steps: tuple[int, ...],
                 causal: bool, strategy: str, itemsize: int, cost: CostModel,
                 target: int | None) -> None:
        self.batch, self.t_in, self.f_in, self.f_out = batch, t_in, f_in, f_out
        self.n_out, self.itemsize, self.cost, self.target = len(steps), itemsize, cost, target
        info = REGISTRY[strategy]
        self.axis, self.max_rows = info.axis, info.max_rows
        self.needed = inputs_needed(steps[-1], t_in, causal)
        # n: steps along the block axis; unit: Jacobian rows (or columns) per step.
        self.n, self.unit = (self.n_out, f_out) if self.axis == "out" else (self.needed, f_in)

    def peak(self, k: int, e: int) -> int:
        if self.axis == "in":
            return forward_peak(self.cost, e, k, self.f_in, self.needed, self.n_out * self.f_out,
                                self.itemsize)
        return self.cost.peak(e, k * self.f_out, self.t_in, self.f_in * self.itemsize)

    def fits(self, e: int) -> Callable[[int], bool]:
        target = self.target
        return lambda k: target is None or self.peak(k, e) <= target

    def check_block_size(self, block_size: int, e: int, budget: int | None) -> int:
        k = min(block_size, self.n)
        if self.fits(e)(k):
            return k
        fit = _largest(self.fits(e), self.n)
        hint = (f"use block_size <= {fit}" if fit else
                f"raise memory_budget to at least "
                f"{format_bytes(self.peak(1, 1) / BUDGET_HEADROOM)}"
                if e == 1 else "lower examples_per_block, or raise memory_budget")
        raise BudgetError(
            f"block_size={block_size} needs about {format_bytes(self.peak(k, e))} of working "
            f"memory for {e} examples x {self.t_in} input steps, over memory_budget="
            f"{format_bytes(budget)}: {hint}.")

    def most_steps(self, e: int) -> int:
        """The most steps per block with ``e`` examples per block (0: not even one)."""
        cap = max(1, self.max_rows // max(1, e * self.unit))
        if self.target is None:
            return min(self.n, cap)
        return _largest(self.fits(e), min(self.n, cap))

    def choose(self, e: int, may_split: bool, budget: int | None) -> tuple[int, int]:
        """(examples, steps) per block within the budget."""
        k = self.most_steps(e)
        if self.target is not None and may_split and k < self.n:
            # The budget stops the block short. Fewer examples per block can leave room
            # for so many more steps that the job needs fewer blocks, and each block
            # costs a forward pass and a loop over its input steps whatever its size.
            # Switch only for a clear gain (20% fewer blocks), and then to the most
            # examples per block within 10% of the fewest blocks.
            def n_blocks(ee: int, kk: int) -> float:
                return -(-self.batch // ee) * -(-self.n // kk) if kk else float("inf")

            options = [(ee, self.most_steps(ee)) for ee in _example_counts(e - 1)]
            fewest = min((n_blocks(ee, kk) for ee, kk in options), default=float("inf"))
            bound = min(0.8 * n_blocks(e, k), 1.1 * fewest)
            e, k = next(((ee, kk) for ee, kk in options if n_blocks(ee, kk) <= bound), (e, k))
        if self.target is not None and k == 0:
            raise BudgetError(
                f"memory_budget={format_bytes(budget)} is too small for even one output step "
                f"of one example at {self.t_in} input steps (needs about "
                f"{format_bytes(self.peak(1, 1))}). Raise memory_budget to at least "
                f"{format_bytes(self.peak(1, 1) / BUDGET_HEADROOM)}.")
        return e, k

    def chunking(self, k: int, e: int, in_chunk: int | None) -> tuple[int, int]:
        """(in_chunk, out_chunk): the chunk along the block axis is the block; the other is
        widened by whole blocks until a chunk holds MIN_CHUNK_BYTES."""
        chunk_bytes = e * k * self.f_out * self.f_in * self.itemsize
        if self.axis == "in":
            if in_chunk is not None and in_chunk != min(k, self.t_in):
                raise InputError(
                    f"in_chunk={in_chunk} must equal the block size ({k} input steps) with "
                    "strategy='forward', so that each block writes whole chunks. Leave "
                    "in_chunk out.")
            out_chunk = k
            while out_chunk < self.n_out and chunk_bytes * out_chunk < MIN_CHUNK_BYTES:
                out_chunk += k
            return min(k, self.t_in), min(out_chunk, self.n_out)
        if in_chunk is None:
            in_chunk = k
            while in_chunk < self.t_in and chunk_bytes * in_chunk < MIN_CHUNK_BYTES:
                in_chunk += k
        return min(in_chunk, self.t_in), k


def _example_counts(hi: int) -> list[int]:
    """Examples-per-block values to try, from ``hi`` down to 1 (a sparse set when large)."""
    if hi <= 256:
        return list(range(hi, 0, -1))
    out, v = [], hi
    while v > 256:
        out.append(v)
        v = int(v / 1.1)
    return out + list(range(v, 0, -1))


def _largest(ok: Any, hi: int) -> int:
    """Largest k in [1, hi] with ok(k) (ok monotone decreasing), or 0."""
    lo, best = 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _shape3(shape: Sequence[int], what: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise InputError(f"the {what} must have shape (batch, steps, features); got a shape "
                         f"of rank {len(shape)}: {shape}.")
    if min(shape) < 1:
        raise InputError(f"the {what} shape {shape} has an empty axis; every axis needs at "
                         "least one element.")
    return shape  # type: ignore[return-value]
