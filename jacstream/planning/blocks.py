"""Plans: a frozen, printable description of a Jacobian job as blocks, chunks and memory.

Pure Python: no TensorFlow here, so plans can be made, printed and tested in
milliseconds. Executors only carry a plan out. :func:`jacstream.planning.make_plan`
makes one.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .steps import inputs_needed
from .strategies import REGISTRY
from .units import format_bytes, itemsize

__all__ = ["BLOCKS_IN_FLIGHT", "LAYOUT", "Block", "CostModel", "Plan", "forward_peak"]

LAYOUT = ("example", "out_step", "out_feature", "in_step", "in_feature")

# Blocks alive at once: the one being computed, one queued, one being written.
BLOCKS_IN_FLIGHT = 3


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
        return inputs_needed(self.out_steps[-1], self.t_in, self.causal)

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
        return itemsize(self.dtype)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the full Jacobian if it were held densely."""
        return math.prod(self.shape) * self.itemsize

    # -- blocks -----------------------------------------------------------
    def block(self, index: int) -> Block:
        """The block with this index (ordered by step block, then example block; by example
        block first for a strategy that sweeps in time)."""
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} out of range (plan has {self.n_blocks} blocks)")
        info = REGISTRY.get(self.strategy)
        if info is not None and info.sweeps:
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
        in_len = inputs_needed(self.out_steps[p1 - 1], self.t_in, self.causal)
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
            return forward_peak(self.cost, e, c1 - c0, self.f_in, block.in_len, k * self.f_out,
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


def forward_peak(cost: CostModel, examples: int, steps: int, f_in: int, in_len: int,
                  out_rows: int, itemsize: int) -> int:
    """Working memory of a forward-mode block of ``steps`` input steps.

    ``steps * f_in`` tangents (copies of each example) run through ``in_len``
    steps; the result holds ``out_rows`` rows per tangent.
    """
    tangents = steps * f_in
    return (cost.peak(examples, tangents, in_len, 0)
            + BLOCKS_IN_FLIGHT * examples * tangents * out_rows * itemsize)
