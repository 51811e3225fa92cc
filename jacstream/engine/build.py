"""Building block functions: validated on the job's inputs, or rebuilt from a frozen spec.

:func:`validated` tries a strategy's implementations, dynamic shapes first,
and returns the first that traces and agrees with the eager model; its
``spec`` records what was decided. :func:`from_spec` builds the same function
from that spec without deciding anything again: a dask worker runs exactly
what the client validated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from .. import events
from ..errors import JacstreamError, ModelError, StrategyUnavailable, first_line
from .models import side_rows
from .strategies import BlockFunction, FunctionSpec, function_class

__all__ = ["from_spec", "validated"]


def from_spec(call: Callable[[Any], Any], spec: FunctionSpec) -> BlockFunction:
    """The block function ``spec`` describes, on the (prepared) model ``call``."""
    return function_class(spec.strategy)(call, spec)


def validated(call: Callable[[Any], Any], strategy: str, f_in: int, f_out: int, device: str,
              sample: np.ndarray, short: np.ndarray, short_shape: tuple[int, ...],
              dtype: str = "float32", y_short: np.ndarray | None = None) -> BlockFunction:
    """Trace strategy ``strategy``'s function and check it against an eager forward pass.

    The dynamic signature must give, on the short sample, the output shape the
    eager model gave; otherwise (e.g. Keras TimeDistributed on a dynamic time
    axis) the function is built with static shapes. A strategy with several
    implementations (forward mode) tries them in order; what failed is kept in
    ``spec.notes``. ``y_short``: the eager outputs on ``short`` where already computed
    (a check that compares with them need not run the model again). Raises :class:`~jacstream.errors.StrategyUnavailable` when
    an optional strategy cannot differentiate the model at all. ``dtype``: what the
    model computes in (:func:`jacstream.engine.models.compute_dtype`).
    """
    cls = function_class(strategy)
    failures: list[str] = []
    last: Exception | None = None
    with events.phase("build", strategy):
        for static in (False, True):
            for impl in cls.impls:
                fn = cls(call, FunctionSpec(strategy, impl, int(f_in), int(f_out), device,
                                            static=static, dtype=dtype))
                try:
                    yfull = _first_calls(fn, sample, short, short_shape, y_short)
                except ModelError as e:
                    if not cls.optional:
                        raise
                    last = e  # e.g. no forward derivative: reverse mode may still work
                    failures.append(f"{impl}: {first_line(e)}")
                    continue
                except Exception as e:
                    last = e
                    failures.append(f"{impl}{' (static shapes)' if static else ''}: "
                                    f"{type(e).__name__}: {first_line(e)}")
                    continue
                fn.spec = replace(fn.spec, t_out=int(yfull[1]), notes=tuple(failures))
                return fn
    if not cls.optional and last is not None:
        if isinstance(last, JacstreamError):
            raise last
        raise ModelError(f"strategy={strategy!r} cannot trace this model: "
                         + "; ".join(failures)) from last
    raise StrategyUnavailable(
        f"strategy={strategy!r} cannot differentiate this model: "
        + "; ".join(failures) + ". Use strategy='pfor' or 'tile' (or 'auto').") from last


def _first_calls(fn: BlockFunction, sample: np.ndarray, short: np.ndarray,
                 short_shape: tuple[int, ...], y_short: np.ndarray | None = None,
                 ) -> tuple[int, ...]:
    """Trace ``fn`` and run it once or twice; the model's output shape at full length."""
    if not fn.static:
        _, ys, _ = fn.tiny(short)
        if ys != tuple(short_shape):
            raise ValueError(f"traced output shape {ys} != eager {tuple(short_shape)}")
    _, yfull, _ = fn.tiny(sample)
    with side_rows(fn.call, 0, sample.shape[0]):   # short is a prefix of the same examples
        if fn.static:
            fn.check(sample)
        else:
            fn.check(short, y_short)
    f_out = fn.spec.f_out
    if len(yfull) != 3 or yfull[0] != sample.shape[0] or yfull[2] != f_out:
        raise ModelError(f"the model returned outputs of shape {yfull} for inputs of shape "
                         f"{sample.shape}; expected (batch, steps, {f_out}).")
    return yfull
