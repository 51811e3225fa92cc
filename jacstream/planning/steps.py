"""Output steps: the user's ``out_steps`` rules, and which input steps an output needs.

No TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import InputError

__all__ = ["inputs_needed", "normalize_out_steps"]


def inputs_needed(last_step: int, t_in: int, causal: bool) -> int:
    """Input steps that outputs up to ``last_step`` depend on: all ``t_in`` unless causal.

    A causal model's output step t depends only on input steps ``<= t``: the one
    formula behind every block's input length, the planner's and the strategy
    prediction's.

    Examples
    --------
    >>> inputs_needed(9, 100, causal=True), inputs_needed(9, 100, causal=False)
    (10, 100)
    """
    return min(t_in, int(last_step) + 1) if causal else t_in


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
