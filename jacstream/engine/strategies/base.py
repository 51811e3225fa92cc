"""The interface every strategy implements: a block function built from a frozen spec.

A strategy is a subclass of :class:`BlockFunction` in its own module of this
package, named in :data:`jacstream.planning.strategies.REGISTRY`. It defines
:meth:`BlockFunction.body`, the traced computation of one block, and may
override :meth:`BlockFunction.blocks` when one call of it yields many blocks.

The function is built from a :class:`FunctionSpec`: what validation decided
(the implementation, static or dynamic shapes, the output length) plus the
plan's block lengths. The spec is frozen and picklable; a dask worker builds
the very same function from it (:func:`jacstream.engine.build.from_spec`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from ...errors import InputError, ModelError
from ...planning import Block, Plan
from .._tf import tf
from ..models import WithSide, step_outputs

__all__ = ["NO_GRADIENT", "BlockFunction", "Computed", "FunctionSpec"]

# One block's result: (Jacobian block, output shape the model gave, input steps fed).
Computed = tuple[np.ndarray, tuple[int, ...], int]

NO_GRADIENT = (
    "the model's outputs do not depend differentiably on its inputs: TensorFlow returned no "
    "gradient (None). This is what happens with an integer cast, tf.stop_gradient, argmax or "
    "round in the path from inputs to outputs, or when a slice of the output is taken outside "
    "the GradientTape. Remove the non-differentiable op, or differentiate a model whose "
    "outputs are a smooth function of its inputs.")


@dataclass(frozen=True)
class FunctionSpec:
    """Everything a block function is built from, as decided by validation and the plan.

    ``static``: full-length inputs and blocks padded to ``static_block`` output
    steps (``static_idx`` output positions for blocks of input steps), for models
    that misbehave on a dynamic time axis. ``t_out``: output steps at full
    length. ``notes``: why implementations were passed over. ``dtype``: what the
    model computes in (its inputs and the Jacobian; the store may round it).
    """

    strategy: str
    impl: str
    f_in: int
    f_out: int
    device: str
    static: bool = False
    static_block: int = 1
    static_idx: int = 0
    t_out: int = 0
    notes: tuple[str, ...] = ()
    dtype: str = "float32"

    def for_plan(self, plan: Plan) -> FunctionSpec:
        """This spec with the block lengths of ``plan`` (used in static-shape mode)."""
        return replace(self, static_block=plan.block_size, static_idx=len(plan.out_steps))


class BlockFunction:
    """The Jacobian of one block, traced once, by one strategy (the base of every strategy).

    Blocks of output steps (``axis = "out"``, reverse mode): ``fn(x, idx, in_len)``
    with ``x`` of shape ``(examples, T_in, F_in)`` and ``idx`` the block's output
    steps returns ``d y[:, idx, :] / d x[:, :in_len]`` of shape ``(examples,
    len(idx), F_out, in_len, F_in)``, the output shape the model gave and the
    input length it was fed. Blocks of input steps (``axis = "in"``, forward
    mode): ``fn(x, idx, in_len, (t0, t1))`` returns the columns ``d y[:, idx, :] /
    d x[:, t0:t1]``, shape ``(examples, len(idx), F_out, t1 - t0, F_in)``, feeding
    the model ``x[:, :in_len]``.

    Normally the input length and the number of steps are dynamic in the traced
    signature, so one trace serves every block, the shorter last block and
    causal truncation. Models that misbehave on a dynamic time axis are detected
    by validation and run with static shapes instead (``spec.static``):
    full-length inputs and blocks padded to one length, so still one or two traces.
    """

    #: "out": blocks of output steps (rows); "in": blocks of input steps (columns)
    axis: ClassVar[str] = "out"
    #: implementations validation tries, in order
    impls: ClassVar[tuple[str, ...]] = ()
    #: a strategy that may fail where another works: its ModelErrors make it unavailable
    optional: ClassVar[bool] = False

    def __init__(self, call: Callable[[Any], Any], spec: FunctionSpec) -> None:
        if spec.impl not in self.impls:
            raise InputError(f"strategy {spec.strategy!r} has the implementations "
                             f"{self.impls}, not {spec.impl!r}.")
        self.call = call
        self.spec = spec
        self.traces = 0
        self._examples: tuple[int, int] | None = None
        sig = [tf.TensorSpec([None, None, spec.f_in], spec.dtype),
               tf.TensorSpec([None], tf.int32)]
        if self.axis == "in":
            sig += [tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)]
        # Side inputs (a model of several inputs) are traced arguments too, after the rest.
        sig += [tf.TensorSpec([None, *v.shape[1:]], v.dtype) for v in self._side_rows(0, 1)]
        self._dynamic_fn = tf.function(self._traced, input_signature=sig)
        self._static_fn = tf.function(self._traced, reduce_retracing=False)

    def _side_rows(self, e0: int, e1: int) -> tuple[np.ndarray, ...]:
        return self.call.rows(e0, e1) if isinstance(self.call, WithSide) else ()

    def _traced(self, x: tf.Tensor, idx: tf.Tensor, *rest: tf.Tensor) -> tuple[tf.Tensor, ...]:
        n_cols = 2 if self.axis == "in" else 0
        if not isinstance(self.call, WithSide):
            return self.body(x, idx, *rest)
        with self.call.bound(rest[n_cols:]):
            return self.body(x, idx, *rest[:n_cols])

    # -- what a strategy defines -------------------------------------------
    def body(self, x: tf.Tensor, idx: tf.Tensor, *cols: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The traced Jacobian of a block and ``tf.shape`` of the model's output."""
        raise NotImplementedError

    def check(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Extra validation on ``x`` after the first calls (raise ModelError to refuse).

        ``y``: the model's eager outputs on ``x``, where the caller has them.
        """

    def record(self) -> dict[str, Any]:
        """Entries for the store's record of the strategy choice."""
        return {}

    def blocks(self, plan: Plan, pending: Sequence[Block],
               read: Callable[[Block], np.ndarray]) -> Iterator[tuple[Block, Computed]]:
        """Compute ``pending`` blocks of ``plan`` in order, yielding each as it is done.

        ``read(block)`` gives the block's inputs. One call per block here; a
        strategy whose one call produces many consecutive blocks (a sweep over
        time for a slab of examples) overrides this and yields them in order.
        """
        for block in pending:
            yield block, self.compute(plan, block, read(block))

    # -- shared ----------------------------------------------------------------
    @property
    def strategy(self) -> str:
        return self.spec.strategy

    @property
    def impl(self) -> str:
        return self.spec.impl

    @property
    def static(self) -> bool:
        return self.spec.static

    @property
    def t_out(self) -> int:
        return self.spec.t_out

    @property
    def notes(self) -> list[str]:
        return list(self.spec.notes)

    @property
    def f_in(self) -> int:
        return self.spec.f_in

    @property
    def f_out(self) -> int:
        return self.spec.f_out

    @property
    def device(self) -> str:
        return self.spec.device

    def bind(self, plan: Plan) -> None:
        """Take the block lengths of ``plan`` (static-shape mode pads blocks to them)."""
        self.spec = self.spec.for_plan(plan)

    def compute(self, plan: Plan, block: Block, x: np.ndarray) -> Computed:
        """Block ``block`` of ``plan`` on its inputs ``x``."""
        p0, p1 = block.positions
        idx = np.asarray(plan.out_steps[p0:p1], dtype=np.int32)
        self._examples = block.examples   # whose side inputs go along (several inputs)
        try:
            return self(x, idx, block.in_len, block.in_steps)
        finally:
            self._examples = None

    def model_outputs(self, x: tf.Tensor, idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The outputs ``y[:, idx]`` and ``tf.shape(y)``, to be called inside a tape.

        ``y`` has three axes: an output ``(batch, features)`` is one output step.
        """
        y = step_outputs(self.call, x)
        # Taken inside the tape: a slice taken outside gives None gradients.
        return tf.gather(y, idx, axis=1), tf.shape(y)

    def __call__(self, x: np.ndarray, idx: np.ndarray, in_len: int | None = None,
                 in_steps: tuple[int, int] | None = None) -> Computed:
        """The block's Jacobian. ``x`` holds the job's first ``len(x)`` examples, or those of
        the block :meth:`compute` is computing (for the side inputs of several inputs)."""
        spec, k, full = self.spec, len(idx), x.shape[1]
        e0, e1 = self._examples or (0, x.shape[0])
        side = tuple(tf.convert_to_tensor(v) for v in self._side_rows(e0, e1))
        in_len = full if in_len is None else in_len
        idx = np.asarray(idx, dtype=np.int32)
        cols: tuple[int, ...] = ()
        skip = 0  # leading columns computed only to keep a static shape
        if self.axis == "in":
            if in_steps is None:
                raise InputError(f"strategy {spec.strategy!r} computes blocks of input steps: "
                                 "pass in_steps=(t0, t1) (Block.in_steps of its plan).")
            t0, t1 = (int(s) for s in in_steps)
            if spec.static:
                c0 = min(t0, max(0, t1 - spec.static_block))
                skip, t0 = t0 - c0, c0
            cols = (t0, t1)
        if spec.static:
            fed = full
            pad_to = spec.static_idx if self.axis == "in" else spec.static_block
            if k < pad_to:
                idx = np.concatenate([idx, np.repeat(idx[-1:], pad_to - k)])
            fn = self._static_fn
        else:
            fed = in_len
            x = x[:, :in_len]
            fn = self._dynamic_fn
        with tf.device(spec.device):
            # Offsets go in as tensors: Python ints would retrace the static function.
            jac, yshape = fn(tf.convert_to_tensor(np.ascontiguousarray(x, dtype=spec.dtype)),
                             tf.convert_to_tensor(idx), *(tf.constant(v, tf.int32) for v in cols),
                             *side)
        out = jac.numpy()
        if spec.static:
            out = out[:, :k, :, skip:] if self.axis == "in" else out[:, :k, :, :in_len]
        return out, tuple(int(s) for s in yshape.numpy()), fed

    def tiny(self, x: np.ndarray) -> Computed:
        """One row (or column) of the Jacobian: traces the function."""
        if self.axis == "in":
            return self(x, np.array([0]), x.shape[1], (0, 1))
        return self(x, np.array([0]))

    @staticmethod
    def no_gradient() -> ModelError:
        return ModelError(NO_GRADIENT)
