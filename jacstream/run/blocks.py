"""Compute and check blocks: the one step the local and the dask executors share.

:func:`checked_blocks` takes the pending blocks of a plan, computes them with
a block function (or takes them from the strategy trial), and checks each:
the model's output shape, the block's shape, NaN/Inf. Both executors call it,
so they cannot drift apart. The block function decides how blocks are made
(:meth:`~jacstream.engine.strategies.base.BlockFunction.blocks`): one call per
block, or a sweep that yields many blocks in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import JacstreamError, ModelError, NonFiniteError
from ..planning import Block, Plan

__all__ = ["Checked", "RunStats", "checked_blocks"]

# One block's result: (Jacobian block, output shape the model gave, input steps fed).
Computed = tuple[np.ndarray, tuple[int, ...], int]


@dataclass
class RunStats:
    """What a run did, for its record in the store."""

    computed_blocks: list[int] = field(default_factory=list)
    skipped_blocks: int = 0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    wall_seconds: float = 0.0
    nonfinite_blocks: list[int] = field(default_factory=list)
    precomputed_blocks: list[int] = field(default_factory=list)  # by the strategy trial


@dataclass
class Checked:
    """A computed block that passed the checks: its data, seconds, and any NaN/Inf warning."""

    block: Block
    data: np.ndarray
    seconds: float
    nonfinite: str | None = None
    precomputed: bool = False


def checked_blocks(fn: Any, plan: Plan, pending: Sequence[Block],
                   read: Callable[[Block], np.ndarray], *, t_out: int | None,
                   on_nonfinite: str, precomputed: dict[int, Computed] | None = None,
                   where: str = "") -> Iterator[Checked]:
    """Compute ``pending`` blocks of ``plan`` with ``fn`` and check each; yield them.

    ``precomputed`` blocks (by the strategy trial) are checked, not computed
    again. NaN/Inf raise :class:`~jacstream.errors.NonFiniteError` with
    ``on_nonfinite="raise"``; with ``"warn"`` the message comes with the block.
    ``where`` (e.g. the dask worker) goes in the note of an error from TensorFlow.
    """
    precomputed = dict(precomputed or {})
    rest = [b for b in pending if b.index not in precomputed]
    for block in pending:
        if block.index in precomputed:
            yield _check(plan, block, precomputed.pop(block.index), 0.0, read, t_out,
                         on_nonfinite, True)
    made = iter(fn.blocks(plan, rest, read))
    for expected in rest:
        t0 = time.perf_counter()
        try:
            block, result = next(made)
        except JacstreamError:
            raise
        except Exception as e:
            _note(e, plan, expected, where)
            raise
        yield _check(plan, block, result, time.perf_counter() - t0, read, t_out, on_nonfinite,
                     False)
        del result  # before the next block is computed: memory stays bounded


def _check(plan: Plan, block: Block, result: Computed, seconds: float,
           read: Callable[[Block], np.ndarray], t_out: int | None, on_nonfinite: str,
           precomputed: bool) -> Checked:
    data, yshape, fed = result
    _check_shapes(plan, block, data, yshape, fed, t_out)
    message = None
    if on_nonfinite != "ignore" and not np.isfinite(data).all():
        message = _nonfinite_message(plan, block, data, read(block))
        if on_nonfinite == "raise":
            raise NonFiniteError(message)
    return Checked(block, data, seconds, message, precomputed)


def _note(e: BaseException, plan: Plan, block: Block, where: str) -> None:
    """Say which block failed (and where) on an error that is not in the user's terms yet."""
    if hasattr(e, "add_note"):
        (e0, e1), (p0, p1) = block.examples, block.positions
        e.add_note(f"jacstream: while computing block {block.index} of {plan.n_blocks}"
                   f"{where}: examples {e0}..{e1 - 1}, output steps "
                   f"{plan.out_steps[p0]}..{plan.out_steps[p1 - 1]}, input length "
                   f"{block.in_len}, input steps {block.columns}")


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


def _nonfinite_message(plan: Plan, block: Block, data: np.ndarray, x: np.ndarray) -> str:
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
    return (f"block {block.index} holds {int(bad.sum())} NaN/Inf values: examples {exs[:10]}"
            f"{'...' if len(exs) > 10 else ''}, output steps {steps[:10]}"
            f"{'...' if len(steps) > 10 else ''}. {cause} Blocks finished before it are safely "
            "stored. To store NaN/Inf and go on, call again with on_nonfinite='warn' (it "
            "resumes) or 'ignore'.")
