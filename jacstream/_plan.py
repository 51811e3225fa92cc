"""Planning: shapes and options in, a frozen, printable plan of blocks out.

Pure Python (NumPy at most): no TensorFlow here, so plans can be made, printed
and tested in milliseconds. Executors only carry a plan out.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import BudgetError, InputError

__all__ = ["Block", "CostModel", "Plan", "format_bytes", "make_plan", "normalize_out_steps",
           "parse_memory"]

LAYOUT = ("example", "out_step", "out_feature", "in_step", "in_feature")

# The axis a strategy's blocks run along: reverse mode computes rows of the
# Jacobian (blocks of output steps), forward mode computes columns (blocks of
# input steps). Both write the same array with the same layout.
STRATEGY_AXIS = {"pfor": "out", "tile": "out", "forward": "in", "sensitivity": "out"}
# Strategies that sweep forward in time: one slab of examples is carried through all
# its blocks of output steps in order, so their blocks are ordered examples first.
SWEEPS = ("sensitivity",)

# Jacobian rows (examples x output steps x output features) per block beyond
# which a block gets no faster per row, only bigger in memory. pfor shares one
# forward pass among a block's rows: on 2 cores its speed stops improving at
# about a thousand rows (reference LSTM, T=1000: K=100 fastest; K=50 +20% time).
# tile repeats the forward pass for every row, so small blocks cost it little:
# 250 rows instead of 1000 took the same time at T=300 and +10% at T=1000, with
# a third of the memory. Forward mode counts columns the same way.
MAX_ROWS_PER_BLOCK = {"pfor": 1024, "tile": 256, "forward": 1024, "sensitivity": 640}
# Chunks smaller than this make too many files; the in-step chunk is widened
# to a multiple of the block size until a chunk reaches it.
MIN_CHUNK_BYTES = 128 * 1024
# Blocks alive at once: the one being computed, one queued, one being written.
BLOCKS_IN_FLIGHT = 3
# Plan to this fraction of the budget: the cost model is fitted on probe blocks of
# at most 512 steps and extrapolated (to T=10000 and beyond); the rest of the
# budget covers what a probe cannot see (the blocks in flight, allocator slack).
BUDGET_HEADROOM = 0.8

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}


def parse_memory(value: int | float | str | None, *, name: str = "memory_budget") -> int | None:
    """Turn ``"2GiB"``, ``"512 MB"`` or a number of bytes into bytes.

    Examples
    --------
    >>> parse_memory("1.5GiB")
    1610612736
    >>> parse_memory(4096)
    4096
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise BudgetError(f"{name} must be bytes (int) or a string like '2GiB', got {value!r}.")
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise BudgetError(
                f"{name}={value!r} is not a size: use bytes (e.g. 2147483648) or a number "
                f"with a unit, e.g. '2GiB', '512MiB', '1.5GB'.")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise BudgetError(f"{name} must be bytes (int) or a string like '2GiB', "
                          f"got {type(value).__name__}.")
    if not math.isfinite(n) or n <= 0:
        raise BudgetError(f"{name} must be positive, got {value!r}.")
    return int(n)


def format_bytes(n: float | None) -> str:
    """Human-readable binary size, e.g. ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def normalize_out_steps(out_steps: Any, t_out: int) -> tuple[int, ...]:
    """Turn the user's ``out_steps`` into a strictly increasing tuple of step numbers.

    Rules: ``None`` is every step; an int is one step; a slice is taken as on a
    NumPy array; a sequence of ints must be strictly increasing (no duplicates).
    Negative numbers count from the end, as in NumPy.

    Examples
    --------
    >>> normalize_out_steps(slice(0, 10, 4), 100)
    (0, 4, 8)
    >>> normalize_out_steps(-1, 100)
    (99,)
    """
    if out_steps is None:
        steps: list[int] = list(range(t_out))
    elif isinstance(out_steps, slice):
        if out_steps.step is not None and out_steps.step <= 0:
            raise InputError(f"out_steps={out_steps!r}: the slice step must be positive, so that "
                             "output steps are in increasing order.")
        steps = list(range(t_out))[out_steps]
    elif isinstance(out_steps, (bool, float)) or (
            hasattr(out_steps, "dtype") and out_steps.dtype.kind not in "iu"):
        raise InputError(f"out_steps must be None, an int, a slice or a sequence of ints; "
                         f"got {out_steps!r}.")
    elif isinstance(out_steps, int) or (hasattr(out_steps, "ndim") and out_steps.ndim == 0):
        steps = [_check_step(int(out_steps), t_out)]
    elif isinstance(out_steps, (Sequence, range)) or hasattr(out_steps, "__array__"):
        raw = list(out_steps)
        for s in raw:
            if isinstance(s, bool) or not isinstance(s, int) and not (
                    hasattr(s, "dtype") and s.dtype.kind in "iu"):
                raise InputError(f"out_steps must hold ints; got {s!r} in {_short(raw)}.")
        steps = [_check_step(int(s), t_out) for s in raw]
        for a, b in zip(steps[:-1], steps[1:], strict=True):
            if b <= a:
                what = "duplicated" if a == b else "not increasing"
                raise InputError(
                    f"out_steps must be strictly increasing, but step {b} is {what} "
                    f"(after {a}) in {_short(raw)}. Pass sorted(set(out_steps)).")
    else:
        raise InputError(f"out_steps must be None, an int, a slice or a sequence of ints; "
                         f"got {type(out_steps).__name__}.")
    if not steps:
        raise InputError(f"out_steps={out_steps!r} selects no output step (the model has "
                         f"{t_out} output steps).")
    return tuple(steps)


def _check_step(s: int, t_out: int) -> int:
    if not -t_out <= s < t_out:
        raise InputError(f"out_steps: step {s} is out of range for a model output with "
                         f"{t_out} steps (valid: 0..{t_out - 1}, or negative from the end).")
    return s % t_out


def _short(seq: Sequence[Any], n: int = 8) -> str:
    seq = list(seq)
    return repr(seq) if len(seq) <= n else repr(seq[:n])[:-1] + ", ...]"


@dataclass(frozen=True)
class CostModel:
    """Working memory of one block, in bytes, as a function of its shape.

    ``peak = fixed + examples * in_len * (per_step + rows * per_row_step)``
    where ``rows`` is output steps x output features in the block. The default
    is a conservative guess; :func:`jacstream.jacobian` replaces it with a
    measurement (two small probe blocks) before planning.
    """

    fixed: float = 64 * 2**20
    per_step: float = 16 * 2**10
    per_row_step: float = 2 * 2**10
    measured: bool = False

    def peak(self, examples: int, rows: int, in_len: int, result_bytes_per_row_step: int) -> int:
        work = examples * in_len * (self.per_step + rows * (
            self.per_row_step + BLOCKS_IN_FLIGHT * result_bytes_per_row_step))
        return int(self.fixed + work)


@dataclass(frozen=True)
class Block:
    """One unit of work: a slab of examples x a run of output positions.

    ``in_len`` is the number of input steps the model is fed. A reverse-mode
    block (``in_steps is None``) computes ``J[examples, positions, :, :in_len]``;
    a forward-mode block computes the columns ``J[examples, positions, :,
    in_steps[0]:in_steps[1]]`` (the positions that can be non-zero).
    """

    index: int
    examples: tuple[int, int]
    positions: tuple[int, int]
    in_len: int
    in_steps: tuple[int, int] | None = None

    @property
    def columns(self) -> tuple[int, int]:
        """The input steps ``(t0, t1)`` of the Jacobian this block computes."""
        return self.in_steps if self.in_steps is not None else (0, self.in_len)


@dataclass(frozen=True)
class Plan:
    """A frozen description of a Jacobian job: blocks, chunks and memory.

    Made by :func:`make_plan`; printable; carries no TensorFlow object.
    """

    batch: int
    t_in: int
    f_in: int
    t_out: int
    f_out: int
    out_steps: tuple[int, ...] = field(repr=False)
    block_size: int
    examples_per_block: int
    in_chunk: int
    causal: bool
    strategy: str
    dtype: str
    memory_budget: int | None
    cost: CostModel
    estimated_peak: int
    # Forward mode ("in") blocks run over input steps: block_size is then input
    # steps per block, in_chunk equals it and out_chunk is the chunk along
    # output steps. Defaults keep plans of older stores loadable.
    axis: str = "out"
    out_chunk: int = 0

    # -- shapes -----------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """Shape of the stored Jacobian: (batch, n_out_steps, F_out, T_in, F_in)."""
        return (self.batch, len(self.out_steps), self.f_out, self.t_in, self.f_in)

    @property
    def chunks(self) -> tuple[int, int, int, int, int]:
        """Zarr chunk shape: one block along examples and the block axis."""
        return (self.examples_per_block, self.out_chunk or self.block_size, self.f_out,
                self.in_chunk, self.f_in)

    @property
    def n_out_blocks(self) -> int:
        """Blocks along the output steps (reverse mode; chunks along them in forward mode)."""
        return -(-len(self.out_steps) // (self.out_chunk or self.block_size))

    @property
    def needed_in_len(self) -> int:
        """Input steps any selected output depends on (all of them unless causal)."""
        return min(self.t_in, self.out_steps[-1] + 1) if self.causal else self.t_in

    @property
    def n_in_blocks(self) -> int:
        """Blocks along the input steps (forward mode only; 1 in reverse mode)."""
        return -(-self.needed_in_len // self.block_size) if self.axis == "in" else 1

    @property
    def n_step_blocks(self) -> int:
        """Blocks along the axis the plan runs over (output or input steps)."""
        return self.n_in_blocks if self.axis == "in" else self.n_out_blocks

    @property
    def n_example_blocks(self) -> int:
        return -(-self.batch // self.examples_per_block)

    @property
    def n_blocks(self) -> int:
        return self.n_step_blocks * self.n_example_blocks

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype in ("float16", "bfloat16") else 4 if self.dtype == "float32" else 8

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the full Jacobian if it were held densely."""
        return math.prod(self.shape) * self.itemsize

    # -- blocks -----------------------------------------------------------
    def block(self, index: int) -> Block:
        """The block with this index (ordered by step block, then example block; by example
        block first for the strategies that sweep in time)."""
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} out of range (plan has {self.n_blocks} blocks)")
        if self.strategy in SWEEPS:
            eb, sb = divmod(index, self.n_step_blocks)
        else:
            sb, eb = divmod(index, self.n_example_blocks)
        e0 = eb * self.examples_per_block
        e1 = min(e0 + self.examples_per_block, self.batch)
        n = len(self.out_steps)
        if self.axis == "in":
            s0 = sb * self.block_size
            s1 = min(s0 + self.block_size, self.t_in)
            p0 = 0
            if self.causal:
                # Outputs before step s0 do not depend on these inputs: start at the
                # chunk holding the first one that does (earlier chunks stay unwritten).
                first = bisect.bisect_left(self.out_steps, s0)
                p0 = first // self.out_chunk * self.out_chunk
            # The last block may pass the needed steps to end on a chunk boundary: those
            # columns are zeros, but the model must be fed them.
            return Block(index, (e0, e1), (p0, n), max(self.needed_in_len, s1), (s0, s1))
        p0 = sb * self.block_size
        p1 = min(p0 + self.block_size, n)
        in_len = min(self.t_in, self.out_steps[p1 - 1] + 1) if self.causal else self.t_in
        return Block(index, (e0, e1), (p0, p1), in_len)

    @property
    def blocks(self) -> Iterator[Block]:
        return (self.block(i) for i in range(self.n_blocks))

    def written_in_len(self, block: Block) -> int:
        """Input steps a block writes: its ``in_len`` rounded up to whole chunks."""
        if not self.causal:
            return self.t_in
        return min(self.t_in, -(-block.in_len // self.in_chunk) * self.in_chunk)

    def block_peak(self, block: Block) -> int:
        e = block.examples[1] - block.examples[0]
        k = block.positions[1] - block.positions[0]
        if self.axis == "in":
            c0, c1 = block.columns
            return _forward_peak(self.cost, e, c1 - c0, self.f_in, block.in_len, k * self.f_out,
                                 self.itemsize)
        return self.cost.peak(e, k * self.f_out, block.in_len, self.f_in * self.itemsize)

    # -- (de)serialisation ------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_steps"] = list(self.out_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        d = dict(d)
        d.setdefault("axis", "out")
        d.setdefault("out_chunk", 0)
        d["out_steps"] = tuple(d["out_steps"])
        d["cost"] = CostModel(**d["cost"])
        return cls(**d)

    def __str__(self) -> str:
        n = len(self.out_steps)
        steps = (f"{self.out_steps[0]}..{self.out_steps[-1]}" if n > 1 else str(self.out_steps[0]))
        budget = format_bytes(self.memory_budget) if self.memory_budget else "none"
        lines = [
            "jacstream plan",
            f"  jacobian shape      {self.shape}  ({', '.join(LAYOUT)})",
            f"  dense size          {format_bytes(self.dense_nbytes)} ({self.dtype})",
            f"  output steps        {n} ({steps})",
            f"  blocks              {self.n_blocks} = {self.n_step_blocks} "
            f"{'input' if self.axis == 'in' else 'output'} blocks of "
            f"{self.block_size} steps x {self.n_example_blocks} example blocks of "
            f"{self.examples_per_block}",
            f"  zarr chunks         {self.chunks}",
            f"  causal truncation   {'yes' if self.causal else 'no'}",
            f"  strategy            {self.strategy}"
            f"{' (forward mode: blocks of input steps)' if self.axis == 'in' else ''}",
            f"  memory budget       {budget}",
            f"  estimated peak      {format_bytes(self.estimated_peak)} "
            f"({'measured cost model' if self.cost.measured else 'default cost guess'})",
        ]
        return "\n".join(lines)

    def with_(self, **changes: Any) -> Plan:
        return replace(self, **changes)


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
    target = None if budget is None else int(budget * BUDGET_HEADROOM)
    cost = cost or CostModel()
    itemsize = 2 if dtype in ("float16", "bfloat16") else 4 if dtype == "float32" else 8
    if strategy not in STRATEGY_AXIS:
        raise InputError(f"strategy must be one of {tuple(STRATEGY_AXIS)}, got {strategy!r}.")
    axis = STRATEGY_AXIS[strategy]
    n_out = len(steps)
    needed = min(t_in, steps[-1] + 1) if causal else t_in
    # n: steps along the block axis; unit: Jacobian rows (or columns) per step.
    n, unit = (n_out, f_out) if axis == "out" else (needed, f_in)

    def peak(k: int, e: int) -> int:
        if axis == "in":
            return _forward_peak(cost, e, k, f_in, needed, n_out * f_out, itemsize)
        return cost.peak(e, k * f_out, t_in, f_in * itemsize)

    for name, v in (("block_size", block_size), ("examples_per_block", examples_per_block),
                    ("in_chunk", in_chunk)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"{name} must be a positive int, got {v!r}.")
    e = min(examples_per_block or batch, batch)
    if block_size is not None:
        k = min(block_size, n)
        if target is not None and peak(k, e) > target:
            fit = _largest(lambda kk: peak(kk, e) <= target, n)
            hint = (f"use block_size <= {fit}" if fit else
                    f"raise memory_budget to at least {format_bytes(peak(1, 1) / BUDGET_HEADROOM)}"
                    if e == 1 else "lower examples_per_block, or raise memory_budget")
            raise BudgetError(
                f"block_size={block_size} needs about {format_bytes(peak(k, e))} of working memory "
                f"for {e} examples x {t_in} input steps, over memory_budget="
                f"{format_bytes(budget)}: {hint}.")
    else:
        def most_steps(ee: int) -> int:
            """The most steps per block with ``ee`` examples per block (0: not even one)."""
            cap = max(1, MAX_ROWS_PER_BLOCK.get(strategy, 1024) // max(1, ee * unit))
            if target is None:
                return min(n, cap)
            return _largest(lambda kk: peak(kk, ee) <= target, min(n, cap))

        k = most_steps(e)
        if target is not None and examples_per_block is None and k < n:
            # The budget stops the block short. Fewer examples per block can leave room
            # for so many more steps that the job needs fewer blocks, and each block
            # costs a forward pass and a loop over its input steps whatever its size.
            # Switch only for a clear gain (20% fewer blocks), and then to the most
            # examples per block within 10% of the fewest blocks.
            def n_blocks(ee: int, kk: int) -> float:
                return -(-batch // ee) * -(-n // kk) if kk else float("inf")

            options = [(ee, most_steps(ee)) for ee in _example_counts(e - 1)]
            fewest = min((n_blocks(ee, kk) for ee, kk in options), default=float("inf"))
            bound = min(0.8 * n_blocks(e, k), 1.1 * fewest)
            e, k = next(((ee, kk) for ee, kk in options if n_blocks(ee, kk) <= bound), (e, k))
        if target is not None:
            if k == 0:
                raise BudgetError(
                    f"memory_budget={format_bytes(budget)} is too small for even one output step "
                    f"of one example at {t_in} input steps (needs about "
                    f"{format_bytes(peak(1, 1))}). Raise memory_budget to at least "
                    f"{format_bytes(peak(1, 1) / BUDGET_HEADROOM)}.")
    # The chunk along the block axis is the block; the other is widened by whole
    # blocks until a chunk holds MIN_CHUNK_BYTES.
    chunk_bytes = e * k * f_out * f_in * itemsize
    if axis == "in":
        if in_chunk is not None and in_chunk != min(k, t_in):
            raise InputError(f"in_chunk={in_chunk} must equal the block size ({k} input steps) "
                             "with strategy='forward', so that each block writes whole chunks. "
                             "Leave in_chunk out.")
        in_chunk = min(k, t_in)
        out_chunk = k
        while out_chunk < n_out and chunk_bytes * out_chunk < MIN_CHUNK_BYTES:
            out_chunk += k
        out_chunk = min(out_chunk, n_out)
    else:
        if in_chunk is None:
            in_chunk = k
            while in_chunk < t_in and chunk_bytes * in_chunk < MIN_CHUNK_BYTES:
                in_chunk += k
        in_chunk = min(in_chunk, t_in)
        out_chunk = k
    return Plan(batch=batch, t_in=t_in, f_in=f_in, t_out=t_out, f_out=f_out, out_steps=steps,
                block_size=k, examples_per_block=e, in_chunk=in_chunk, causal=bool(causal),
                strategy=strategy, dtype=dtype, memory_budget=budget, cost=cost,
                estimated_peak=peak(k, e), axis=axis, out_chunk=out_chunk)


def _forward_peak(cost: CostModel, examples: int, steps: int, f_in: int, in_len: int,
                  out_rows: int, itemsize: int) -> int:
    """Working memory of a forward-mode block of ``steps`` input steps.

    ``steps * f_in`` tangents (copies of each example) run through ``in_len``
    steps; the result holds ``out_rows`` rows per tangent.
    """
    tangents = steps * f_in
    return (cost.peak(examples, tangents, in_len, 0)
            + BLOCKS_IN_FLIGHT * examples * tangents * out_rows * itemsize)


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
