"""Faster tracing of ``pfor`` (``batch_jacobian``) through recurrent loops.

Tracing ``batch_jacobian`` through a Keras RNN takes seconds, and most of it
is TensorFlow's ``pfor`` converting the gradient's ``while`` loop. Two parts
of that work are wasted, and :func:`fast_pfor_tracing` removes both while it
is active (only around jacstream's own trace; TensorFlow is left as it was):

1. **Converting the loop twice.** ``pfor`` first converts the loop body
   assuming the loop variables that start out the same for every Jacobian row
   stay that way. The gradient's carried state (``dh``, ``dc`` and the
   ``dx`` accumulator, which start as zeros) does not, so ``pfor`` throws the
   converted loop away, stacks those inputs and converts it again (measured on
   the reference LSTM: ~1.5 s of a ~4 s trace). Here the inputs that the body
   makes row-dependent are found first, by following the body's data flow
   from the row-dependent inputs to a fixed point, and stacked before the
   single conversion. On the RNN gradients measured (Keras LSTM, GRU) the
   analysis stacks exactly the inputs ``pfor``'s retry stacks. Should it find
   fewer, ``pfor`` still retries as before; should it find more, those inputs
   are copied per row (same values, so the same Jacobian); if it cannot run
   (another TensorFlow version), nothing is changed.
2. **AutoGraph on pfor's own helpers.** ``pfor`` wraps its internal helpers
   in ``tf.function``, whose AutoGraph rewrites their source on every trace
   in a new process although they hold no Python control flow on tensors.
   They are traced with ``autograph=False``.

The Jacobians are the same (the tests compare every strategy with
``tape.batch_jacobian``, on loops of several kinds); only the time to build
the function changes.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["fast_pfor_tracing", "rows_dependent_outputs"]

# Ops whose outputs do not depend on the values of their inputs, only on their
# shapes: pfor keeps them the same for every row (a stacked input's row axis is
# dropped from its shape).
_SHAPE_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank", "TensorListLength",
                        "TensorListElementShape", "TensorArraySizeV3", "VariableShape"})

_LOCK = threading.Lock()
_DEPTH = 0
_SAVED: dict[str, Any] = {}


def rows_dependent_outputs(graph: Any, dependent_inputs: set[int]) -> set[int]:
    """Indices of ``graph.outputs`` that depend on the inputs ``dependent_inputs``.

    Follows data edges in the order the operations were created (a function
    graph's order is topological); shape-only operations stop the dependence,
    and any other operation (nested functions included) passes it from any
    input to all of its outputs.
    """
    marked = {graph.inputs[i].ref() for i in dependent_inputs}
    for op in graph.get_operations():
        if op.type in _SHAPE_OPS:
            continue
        if any(t.ref() in marked for t in op.inputs):
            marked.update(t.ref() for t in op.outputs)
    return {i for i, t in enumerate(graph.outputs) if t.ref() in marked}


def _stack_first(converter: Any) -> None:
    """Stack the loop inputs that the body makes row-dependent (see module docstring)."""
    pfor_input = converter._pfor_input
    body = converter._body_func.graph
    passthrough = set(converter._body_pass_through_indices)
    if len(body.inputs) != pfor_input.num_inputs or len(body.outputs) != len(body.inputs):
        return
    stacked = {i for i, inp in enumerate(pfor_input.inputs) if inp.is_stacked}
    start = set(stacked)
    while True:
        reached = rows_dependent_outputs(body, stacked) - passthrough
        if reached <= stacked:
            break
        stacked |= reached
    extra = sorted(stacked - start)
    if extra:
        pfor_input.stack_inputs(stack_indices=extra, tile_variants=True)


def _patched_call(original: Any) -> Any:
    @functools.wraps(original)
    def call(self: Any) -> Any:
        # pfor's own retry calls this again; the fixed point then adds nothing.
        try:
            _stack_first(self)
        except Exception:  # an unknown TensorFlow layout: leave it to pfor's own retry
            pass
        return original(self)
    return call


class _NoAutograph:
    """Stands in for ``def_function`` inside pfor: ``function`` without AutoGraph."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def function(self, func: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("autograph", False)
        return self._module.function(func, **kwargs)


def _install() -> None:
    from tensorflow.python.ops.parallel_for import pfor as pfor_lib

    converter = getattr(pfor_lib, "WhileV2", None)
    if converter is not None:
        _SAVED["call"] = converter.__call__
        converter.__call__ = _patched_call(converter.__call__)
    if hasattr(pfor_lib, "def_function"):
        _SAVED["def_function"] = pfor_lib.def_function
        pfor_lib.def_function = _NoAutograph(pfor_lib.def_function)


def _uninstall() -> None:
    from tensorflow.python.ops.parallel_for import pfor as pfor_lib

    if "call" in _SAVED:
        pfor_lib.WhileV2.__call__ = _SAVED.pop("call")
    if "def_function" in _SAVED:
        pfor_lib.def_function = _SAVED.pop("def_function")


@contextlib.contextmanager
def fast_pfor_tracing() -> Iterator[None]:
    """Inside ``with``: pfor converts loops once and without AutoGraph (see module docstring).

    Re-entrant and thread-safe: installed by the first ``with`` to enter and
    removed by the last to leave.

    Examples
    --------
    >>> import tensorflow as tf
    >>> from jacstream.engine.pfor import fast_pfor_tracing
    >>> @tf.function
    ... def f(x):
    ...     with tf.GradientTape() as tape:
    ...         tape.watch(x)
    ...         y = tf.math.cumsum(x, axis=1) ** 2
    ...     with fast_pfor_tracing():
    ...         return tape.batch_jacobian(y, x)
    >>> f(tf.ones((2, 3))).shape
    TensorShape([2, 3, 3])
    """
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            _install()
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _uninstall()
