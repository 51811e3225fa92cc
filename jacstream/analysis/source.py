"""Reductions of a Jacobian, computed slab by slab so that memory stays bounded.

One machinery serves two callers. :mod:`jacstream.analysis` feeds an
accumulator slabs read back from a store (or any array in the jacstream
layout); :func:`jacstream.jacobian` with ``reduce=`` feeds it the blocks as
they are computed and keeps only the reduced result. A slab is a run of
examples x a run of output positions x a prefix (or window) of input steps:

    data[i, a, f1, t, f2] = J[e0 + i, p0 + a, f1, t0 + t, f2]

Input steps past the end of a slab are zero. That is the causal truncation: an
output step t1 of a causal model does not depend on inputs t2 > t1, so the
store never holds them and every accumulator here is exact without them.

No TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from ..planning import LAYOUT, inputs_needed

__all__ = ["Accumulator", "Layout", "Source", "as_source", "feed", "update_cropped"]

# Upper bound on the bytes of one slab read back from a store. The working
# memory of a reduction is a small multiple of it (absolute value, float64
# copy) plus its result.
SLAB_BYTES = 32 * 2**20


# --------------------------------------------------------------------------- what is reduced
@dataclass(frozen=True)
class Layout:
    """Shape and coordinates of a Jacobian: what a reduction needs to know of it."""

    shape: tuple[int, int, int, int, int]
    out_steps: np.ndarray = field(repr=False)
    causal: bool = False

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def n_out(self) -> int:
        return self.shape[1]

    @property
    def f_out(self) -> int:
        return self.shape[2]

    @property
    def t_in(self) -> int:
        return self.shape[3]

    @property
    def f_in(self) -> int:
        return self.shape[4]


class Source:
    """Read access to a Jacobian-shaped array, slab by slab."""

    def __init__(self, array: Any, layout: Layout, chunks: tuple[int, int],
                 itemsize: int) -> None:
        self.array = array
        self.layout = layout
        self.chunks = chunks        # natural slab extent along (examples, out positions)
        self.itemsize = itemsize

    def read(self, e: tuple[int, int], p: tuple[int, int], t: tuple[int, int]) -> np.ndarray:
        data = self.array[e[0]:e[1], p[0]:p[1], :, t[0]:t[1], :]
        if hasattr(data, "compute"):           # dask
            data = data.compute()
        return np.asarray(data)


def as_source(J: Any) -> Source:
    """Wrap a :class:`jacstream.Jacobian`, zarr/dask/NumPy array or xarray.DataArray."""
    if hasattr(J, "plan") and hasattr(J, "array") and hasattr(J, "out_steps"):   # Jacobian
        arr = J.array
        layout = Layout(tuple(int(s) for s in arr.shape),  # type: ignore[arg-type]
                        np.asarray(J.out_steps), bool(J.causal))
        return Source(arr, layout, (int(arr.chunks[0]), int(arr.chunks[1])),
                      np.dtype(arr.dtype).itemsize)
    out_steps = None
    if hasattr(J, "dims") and hasattr(J, "coords") and hasattr(J, "data"):     # xarray
        if set(J.dims) != set(LAYOUT):
            raise InputError(f"a DataArray passed as a Jacobian must have the dims {LAYOUT}; "
                             f"got {tuple(J.dims)}. Use Jacobian.to_xarray().")
        J = J.transpose(*LAYOUT)
        if "out_step" in J.coords:
            out_steps = np.asarray(J.coords["out_step"].values)
        J = J.data
    if not (hasattr(J, "shape") and hasattr(J, "dtype")):
        try:
            J = np.asarray(J)
        except Exception:
            raise InputError(f"expected a jacstream.Jacobian or an array of shape (examples, "
                             f"out_steps, out_features, in_steps, in_features); got "
                             f"{type(J).__name__}.") from None
    shape = tuple(int(s) for s in J.shape)
    if len(shape) != 5:
        hint = (" A single example's Jacobian J[i] has rank 4: pass J[i:i+1] instead."
                if len(shape) == 4 else "")
        raise InputError(f"expected a Jacobian of shape (examples, out_steps, out_features, "
                         f"in_steps, in_features); got shape {shape} (rank {len(shape)}).{hint}")
    if 0 in shape:
        raise InputError(f"the Jacobian has an empty axis: shape {shape}.")
    if np.dtype(J.dtype).kind not in "fiu":
        raise InputError(f"the Jacobian must hold real numbers; got dtype {J.dtype}.")
    if out_steps is None:
        out_steps = np.arange(shape[1])
    if hasattr(J, "chunksize"):                      # dask
        chunks = (int(J.chunksize[0]), int(J.chunksize[1]))
    elif hasattr(J, "chunks") and isinstance(J.chunks, tuple) and len(J.chunks) == 5 and all(
            isinstance(c, int) for c in J.chunks):    # zarr
        chunks = (int(J.chunks[0]), int(J.chunks[1]))
    else:
        chunks = (shape[0], shape[1])
    return Source(J, Layout(shape, np.asarray(out_steps), False),  # type: ignore[arg-type]
                  chunks, np.dtype(J.dtype).itemsize)


# --------------------------------------------------------------------------- accumulators
class Accumulator:
    """Base class: a reduction fed slabs in any order, then asked for its result.

    ``examples``, ``positions`` and ``steps`` give the region of J it needs;
    ``align`` is the granularity slabs must respect along output positions.
    """

    examples: tuple[int, int]
    positions: tuple[int, int]
    steps: tuple[int, int]
    align: int = 1

    def update(self, e0: int, p0: int, t0: int, data: np.ndarray) -> None:
        raise NotImplementedError

    def steps_for(self, lay: Layout, p0: int, p1: int) -> tuple[int, int]:
        """The input steps to read for output positions ``[p0, p1)``: the region's, up to
        the last one a causal Jacobian holds for them (the rest is zero)."""
        t_lo, t_hi = self.steps
        if lay.causal:
            t_hi = max(t_lo, inputs_needed(int(lay.out_steps[p1 - 1]), t_hi, causal=True))
        return t_lo, t_hi

    def result(self) -> Any:
        raise NotImplementedError


# --------------------------------------------------------------------------- feeding slabs
def _slab_ranges(lo: int, hi: int, step: int) -> Iterator[tuple[int, int]]:
    for a in range(lo, hi, step):
        yield a, min(a + step, hi)


def feed(source: Source, acc: Accumulator, slab_bytes: int | None = None) -> Any:
    """Read the region ``acc`` needs from ``source`` slab by slab; return ``acc.result()``.

    Output positions are the outer loop, so every example of a run of output
    positions is seen before the next run starts. Each slab reads only the input
    steps ``acc.steps_for`` asks for: for a causal Jacobian, none after the
    slab's last output step (they are zero); for a window of lags, only those.
    """
    lay = source.layout
    slab_bytes = SLAB_BYTES if slab_bytes is None else slab_bytes
    (e_lo, e_hi), (p_lo, p_hi), (t_lo, t_hi) = acc.examples, acc.positions, acc.steps
    # (t_hi - t_lo: the widest a slab's input steps can be, so slabs are never too big)
    # One (example, output position) row of the region; slabs follow the store's
    # chunks, cut down (output positions first) until they fit in slab_bytes.
    row_bytes = lay.f_out * (t_hi - t_lo) * lay.f_in * source.itemsize
    rows_fit = max(1, slab_bytes // max(1, row_bytes))
    step_e = max(1, min(source.chunks[0], e_hi - e_lo))
    step_p = max(1, min(source.chunks[1], rows_fit // step_e))
    step_e = max(1, min(step_e, rows_fit // step_p))
    step_p = max(acc.align, step_p // acc.align * acc.align)
    for p0, p1 in _slab_ranges(p_lo, p_hi, step_p):
        t0, t1 = acc.steps_for(lay, p0, p1)
        for e0, e1 in _slab_ranges(e_lo, e_hi, step_e):
            acc.update(e0, p0, t0, source.read((e0, e1), (p0, p1), (t0, t1)))
    return acc.result()


def update_cropped(acc: Accumulator, e: tuple[int, int], p: tuple[int, int], t0: int,
                   data: np.ndarray) -> None:
    """Give ``acc`` the part of a block (examples e, positions p, steps from t0) it needs."""
    e0, e1 = max(e[0], acc.examples[0]), min(e[1], acc.examples[1])
    p0, p1 = max(p[0], acc.positions[0]), min(p[1], acc.positions[1])
    if e0 >= e1 or p0 >= p1:
        return
    s0 = max(t0, acc.steps[0])
    s1 = max(s0, min(t0 + data.shape[3], acc.steps[1]))
    acc.update(e0, p0, s0, data[e0 - e[0]:e1 - e[0], p0 - p[0]:p1 - p[0], :,
                                s0 - t0:s1 - t0, :])
