"""Step axes of a reduction: kept, summed over one window, or over consecutive windows;
and the operations (sum, max, signed extreme) applied over them. No TensorFlow here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["Axis", "Op", "bin_axis", "make_axis"]


@dataclass(frozen=True)
class Axis:
    """How a step axis is reduced: kept, summed over one window, or over consecutive windows.

    ``edges`` are the window boundaries (indices along the axis): window j is
    ``[edges[j], edges[j+1])``. ``drop`` means a single window whose axis is
    removed from the result. ``lo, hi`` is the range that must be read.
    """

    lo: int
    hi: int
    edges: np.ndarray = field(repr=False)
    drop: bool = False

    @property
    def identity(self) -> bool:
        return len(self.edges) == self.hi - self.lo + 1 and not self.drop

    @property
    def n(self) -> int:
        return len(self.edges) - 1


def make_axis(spec: Any, n: int, name: str) -> Axis:
    """``None``: keep; ``slice``: one window, summed away; ``int w``: windows of ``w`` steps."""
    if spec is None or (isinstance(spec, int) and not isinstance(spec, bool) and spec == 1):
        return Axis(0, n, np.arange(n + 1))
    if isinstance(spec, slice):
        start, stop, step = spec.indices(n)
        if step != 1:
            raise InputError(f"{name}={spec!r}: windows must be contiguous (slice step 1); use "
                             f"an int for consecutive windows of that many steps.")
        if stop <= start:
            raise InputError(f"{name}={spec!r} selects no step of an axis of {n} steps.")
        return Axis(start, stop, np.array([start, stop]), drop=True)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool) and spec >= 1:
        return Axis(0, n, np.append(np.arange(0, n, int(spec)), n))
    raise InputError(f"{name} must be None (keep the axis), a slice (sum over that window) or a "
                     f"positive int (sum over consecutive windows of that many steps); got "
                     f"{spec!r}.")


def bin_axis(data: np.ndarray, axis: int, lo: int, ax: Axis, op: Op) -> tuple[int, np.ndarray]:
    """Reduce ``data`` (covering indices ``[lo, lo + n)`` of ``ax``) into ax's windows.

    Returns the index of the first window touched and the per-window values.
    """
    n = data.shape[axis]
    if ax.identity:
        return lo - ax.lo, data
    if n == 0:
        shape = list(data.shape)
        shape[axis] = 0
        return 0, np.zeros(shape, data.dtype)
    j0 = int(np.searchsorted(ax.edges, lo, side="right")) - 1
    j1 = int(np.searchsorted(ax.edges, lo + n, side="left"))
    starts = np.maximum(ax.edges[j0:j1], lo) - lo
    return j0, op.reduceat(data, starts, axis)


class Op:
    """A reduction operation: over axes, over windows (reduceat), and between partials."""

    def __init__(self, name: str) -> None:
        self.name = name

    def reduce(self, a: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
        if self.name == "sum":
            return a.sum(axis=axis)
        if self.name == "max":
            return a.max(axis=axis)
        hi, lo = a.max(axis=axis), a.min(axis=axis)
        return np.where(hi >= -lo, hi, lo)

    def reduceat(self, a: np.ndarray, starts: np.ndarray, axis: int) -> np.ndarray:
        if self.name == "sum":
            return np.add.reduceat(a, starts, axis=axis)
        if self.name == "max":
            return np.maximum.reduceat(a, starts, axis=axis)
        hi = np.maximum.reduceat(a, starts, axis=axis)
        lo = np.minimum.reduceat(a, starts, axis=axis)
        return np.where(hi >= -lo, hi, lo)
