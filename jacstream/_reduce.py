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

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._plan import LAYOUT, Block, Plan
from .errors import InputError, NotAStoreError, StoreError, StoreMismatchError

if TYPE_CHECKING:
    import xarray

__all__ = ["REDUCTIONS", "Layout", "Reduction", "as_reduction", "as_source", "feed",
           "load_reduced", "run_streaming"]

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


# --------------------------------------------------------------------------- step axes
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


def _bin(data: np.ndarray, axis: int, lo: int, ax: Axis, op: _Op) -> tuple[int, np.ndarray]:
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


# --------------------------------------------------------------------------- operations
class _Op:
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

    def result(self) -> Any:
        raise NotImplementedError


def _examples(example: int | None, batch: int) -> tuple[int, int]:
    if example is None:
        return (0, batch)
    if isinstance(example, bool) or not isinstance(example, (int, np.integer)):
        raise InputError(f"example must be None (average over examples) or an int; got "
                         f"{example!r}.")
    if not -batch <= example < batch:
        raise InputError(f"example={example} is out of range for a Jacobian of {batch} "
                         f"examples (valid: 0..{batch - 1}).")
    e = int(example) % batch
    return (e, e + 1)


def _feature(f: int | None, n: int, name: str) -> slice:
    if f is None:
        return slice(None)
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not -n <= f < n:
        raise InputError(f"{name} must be None (all features) or an int in 0..{n - 1}; got "
                         f"{f!r}.")
    f = int(f) % n
    return slice(f, f + 1)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def _prepare(data: np.ndarray, absolute: bool) -> np.ndarray:
    data = data.astype(np.float64, copy=False)
    return np.abs(data) if absolute else data


class WindowSum(Accumulator):
    """Sums of J over windows of input steps and/or output positions."""

    def __init__(self, layout: Layout, in_steps: Any = None, out_steps: Any = None,
                 absolute: bool = False, example: int | None = None) -> None:
        if in_steps is None and out_steps is None:
            raise InputError("window_sum needs in_steps or out_steps (or both): e.g. "
                             "in_steps=slice(0, 10) sums J[:, :, :, 0:10] over input steps.")
        self.layout, self.absolute, self.example = layout, bool(absolute), example
        self.ax_in = make_axis(in_steps, layout.t_in, "in_steps")
        self.ax_out = make_axis(out_steps, layout.n_out, "out_steps")
        self.examples = _examples(example, layout.batch)
        self.positions = (self.ax_out.lo, self.ax_out.hi)
        self.steps = (self.ax_in.lo, self.ax_in.hi)
        n_e = self.examples[1] - self.examples[0]
        self.acc = np.zeros((n_e, self.ax_out.n, layout.f_out, self.ax_in.n, layout.f_in))

    def update(self, e0: int, p0: int, t0: int, data: np.ndarray) -> None:
        v = _prepare(data, self.absolute)
        op = _Op("sum")
        jo, v = _bin(v, 1, p0, self.ax_out, op)
        ji, v = _bin(v, 3, t0, self.ax_in, op)
        i = e0 - self.examples[0]
        self.acc[i:i + v.shape[0], jo:jo + v.shape[1], :, ji:ji + v.shape[3]] += v

    def result(self) -> xarray.DataArray:
        import xarray as xr

        lay = self.layout
        what = "|J|" if self.absolute else "J"
        attrs: dict[str, Any] = {"reduction": "window_sum", "values": what}
        dims: list[str] = []
        coords: dict[str, Any] = {}
        index: list[int | slice] = []

        def keep(name: str, labels: np.ndarray) -> None:
            dims.append(name)
            coords[name] = labels
            index.append(slice(None))

        if self.example is None:
            keep("example", np.arange(*self.examples))
        else:
            index.append(0)
            attrs["example"] = self.examples[0]
        parts = []
        for ax, name, labels in ((self.ax_out, "out", lay.out_steps),
                                 (self.ax_in, "in", np.arange(lay.t_in))):
            if ax.drop:
                index.append(0)
                attrs[f"{name}_window"] = [int(labels[ax.lo]), int(labels[ax.hi - 1])]
                parts.append(f"{name}put steps {labels[ax.lo]}..{labels[ax.hi - 1]}")
            elif ax.identity:
                keep(f"{name}_step", labels[ax.lo:ax.hi])
            else:
                keep(f"{name}_window", labels[ax.edges[:-1]])
                coords[f"{name}_window_last"] = (f"{name}_window", labels[ax.edges[1:] - 1])
                parts.append(f"consecutive windows of {name}put steps")
            keep(f"{name}_feature", np.arange(lay.f_out if name == "out" else lay.f_in))
        attrs["description"] = f"{what} summed over {' and '.join(reversed(parts))}"
        return xr.DataArray(self.acc[tuple(index)], dims=dims, coords=coords,
                            name="window_sum", attrs=attrs)


class Map(Accumulator):
    """An (output step x input step) map: features reduced, optionally binned, per example
    or averaged over examples."""

    def __init__(self, layout: Layout, reduce: str = "sum", absolute: bool = True,
                 example: int | None = None, out_feature: int | None = None,
                 in_feature: int | None = None, bins: Any = None) -> None:
        _choice("reduce", reduce, ("sum", "max", "extreme"))
        self.layout, self.absolute, self.example = layout, bool(absolute), example
        self.op = _Op(reduce)
        self.f1 = _feature(out_feature, layout.f_out, "out_feature")
        self.f2 = _feature(in_feature, layout.f_in, "in_feature")
        bo, bi = (bins, bins) if not isinstance(bins, tuple) else bins
        for b in (bo, bi):
            if b is not None and (isinstance(b, bool) or not isinstance(b, (int, np.integer))
                                  or b < 1):
                raise InputError(f"bins must be None, a positive int or a pair of them (output "
                                 f"steps, input steps) per pixel; got {bins!r}.")
        self.ax_out = make_axis(bo, layout.n_out, "bins")
        self.ax_in = make_axis(bi, layout.t_in, "bins")
        self.examples = _examples(example, layout.batch)
        self.positions = (0, layout.n_out)
        self.steps = (0, layout.t_in)
        # A window's max is final only when all its rows are in one slab; sums add up.
        self.align = 1 if reduce == "sum" else int(bo or 1)
        # Entries past a slab's end are zero: a signed max over a window that reaches
        # past the end is at least 0 (a sum or an |J| max or an extreme is unchanged).
        self._zero_floor = reduce == "max" and not self.absolute
        self.acc = np.zeros((self.ax_out.n, self.ax_in.n))

    def update(self, e0: int, p0: int, t0: int, data: np.ndarray) -> None:
        assert t0 == 0, "maps read every input step"
        v = self.op.reduce(_prepare(data[:, :, self.f1, :, self.f2], self.absolute), (2, 4))
        width = v.shape[2]
        ji, v = _bin(v, 2, 0, self.ax_in, self.op)           # (e, k, windows touched)
        full: np.ndarray = np.zeros(v.shape[:2] + (self.ax_in.n,))
        if self._zero_floor:
            full[...] = -np.inf
        full[:, :, ji:ji + v.shape[2]] = v
        if self._zero_floor:
            beyond = self.ax_in.edges[1:] > width
            full[:, :, beyond] = np.maximum(full[:, :, beyond], 0.0)
        jo, full = _bin(full, 1, p0, self.ax_out, self.op)
        self.acc[jo:jo + full.shape[1]] += full.sum(axis=0)

    @property
    def n_examples(self) -> int:
        return self.examples[1] - self.examples[0]

    def result(self) -> xarray.DataArray:
        import xarray as xr

        values = self.acc / self.n_examples
        steps = self.layout.out_steps
        coords: dict[str, Any] = {"out_step": steps[self.ax_out.edges[:-1]],
                                  "in_step": self.ax_in.edges[:-1]}
        if not self.ax_out.identity:
            coords["out_step_last"] = ("out_step", steps[self.ax_out.edges[1:] - 1])
        if not self.ax_in.identity:
            coords["in_step_last"] = ("in_step", self.ax_in.edges[1:] - 1)
        what = "|J|" if self.absolute else "J"
        attrs = {"reduction": "influence_map", "reduce": self.op.name, "values": what,
                 "example": -1 if self.example is None else self.examples[0],
                 "description": f"{self.op.name} of {what} over features, "
                 + ("averaged over examples" if self.example is None
                    else f"example {self.examples[0]}")}
        return xr.DataArray(values, dims=("out_step", "in_step"), coords=coords,
                            name="influence", attrs=attrs)


class LagProfile(Accumulator):
    """Mean |J| (or J) per lag t1 - t2, per example."""

    def __init__(self, layout: Layout, absolute: bool = True) -> None:
        self.layout, self.absolute = layout, bool(absolute)
        self.examples = (0, layout.batch)
        self.positions = (0, layout.n_out)
        self.steps = (0, layout.t_in)
        steps = layout.out_steps
        self.lag_min = int(steps.min()) - (layout.t_in - 1)
        self.lag_max = int(steps.max())
        self.acc = np.zeros((layout.batch, self.lag_max - self.lag_min + 1))

    def update(self, e0: int, p0: int, t0: int, data: np.ndarray) -> None:
        width = data.shape[3]
        if width == 0:
            return
        v = _prepare(data, self.absolute).sum(axis=(2, 4))[:, :, ::-1]   # (e, k, t descending)
        rows = self.acc[e0:e0 + v.shape[0]]
        for a, t1 in enumerate(self.layout.out_steps[p0:p0 + v.shape[1]]):
            hi = int(t1) - t0 - self.lag_min          # lag of the first step read
            rows[:, hi - width + 1:hi + 1] += v[:, a]

    def counts(self) -> np.ndarray:
        """Number of (t1, t2) pairs at each lag, features included."""
        lay = self.layout
        diff = np.zeros(self.acc.shape[1] + 1, np.int64)
        s = lay.out_steps.astype(np.int64) - self.lag_min
        np.add.at(diff, s - (lay.t_in - 1), 1)
        np.add.at(diff, s + 1, -1)
        return np.cumsum(diff[:-1]) * lay.f_out * lay.f_in

    def result(self) -> xarray.Dataset:
        import xarray as xr

        lags = np.arange(self.lag_min, self.lag_max + 1)
        count = self.counts()
        keep = count > 0
        if self.layout.causal:   # negative lags are exactly zero by construction
            keep &= lags >= 0
        per_example = self.acc[:, keep] / count[keep]
        what = "|J|" if self.absolute else "J"
        return xr.Dataset(
            {"mean": ("lag", per_example.mean(axis=0),
                      {"description": f"mean {what} at this lag, averaged over examples"}),
             "std": ("lag", per_example.std(axis=0),
                     {"description": "standard deviation across examples of the per-example "
                                     "mean"}),
             "per_example": (("example", "lag"), per_example,
                             {"description": f"mean {what} over the (t1, t2) pairs and "
                                             "features at this lag, per example"}),
             "count": ("lag", count[keep],
                       {"description": "entries (t1, t2, features) averaged at this lag"})},
            coords={"lag": lags[keep], "example": np.arange(self.layout.batch)},
            attrs={"reduction": "lag_profile", "values": what, "causal": int(self.layout.causal),
                   "description": f"mean {what} as a function of the lag t1 - t2 "
                                  "(output step minus input step)"})


class TopK(Accumulator):
    """Per output step and output feature: the k (input step, input feature) pairs of
    largest |J| (one example) or mean |J| (over examples)."""

    def __init__(self, layout: Layout, k: int = 5, example: int | None = None) -> None:
        n = layout.t_in * layout.f_in
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise InputError(f"k must be an int in 1..{n} (input steps x input features); got "
                             f"{k!r}.")
        self.layout, self.k, self.example = layout, int(k), example
        self.examples = _examples(example, layout.batch)
        self.positions = (0, layout.n_out)
        self.steps = (0, layout.t_in)
        shape = (layout.n_out, layout.f_out, self.k)
        self.in_step = np.zeros(shape, np.int64)
        self.in_feature = np.zeros(shape, np.int64)
        self.value = np.zeros(shape)
        self._pending: dict[tuple[int, int], list[Any]] = {}

    def update(self, e0: int, p0: int, t0: int, data: np.ndarray) -> None:
        key = (p0, p0 + data.shape[1])
        v = np.abs(data.astype(np.float64, copy=False)).sum(axis=0)       # (k, F1, W, F2)
        slot = self._pending.get(key)
        if slot is None:
            self._pending[key] = slot = [v, 0]
        else:
            slot[0] = _add_padded(slot[0], v)
        slot[1] += data.shape[0]
        if slot[1] == self.examples[1] - self.examples[0]:
            del self._pending[key]
            self._rank(key[0], slot[0] / slot[1])

    def _rank(self, p0: int, v: np.ndarray) -> None:
        k_rows, f1, width, f2 = v.shape
        flat = v.reshape(k_rows, f1, width * f2)
        if flat.shape[2] < self.k:   # the steps not stored are zeros: pad up to k
            flat = np.concatenate(
                [flat, np.zeros((k_rows, f1, self.k - flat.shape[2]))], axis=2)
        # A stable sort ranks ties by input step, as NumPy would on the full row.
        idx = np.argsort(-flat, axis=2, kind="stable")[:, :, :self.k]
        rows = slice(p0, p0 + k_rows)
        self.value[rows] = np.take_along_axis(flat, idx, axis=2)
        self.in_step[rows], self.in_feature[rows] = np.divmod(idx, f2)

    def result(self) -> xarray.Dataset:
        import xarray as xr

        if self._pending:
            raise AssertionError(f"top_k: output positions {sorted(self._pending)} did not "
                                 "see every example")
        score = "|J|" if self.example is not None else "mean |J| over examples"
        dims = ("out_step", "out_feature", "rank")
        return xr.Dataset(
            {"in_step": (dims, self.in_step, {"description": "input step t2"}),
             "in_feature": (dims, self.in_feature, {"description": "input feature f2"}),
             "value": (dims, self.value, {"description": score})},
            coords={"out_step": self.layout.out_steps, "out_feature": np.arange(self.layout.f_out),
                    "rank": np.arange(self.k)},
            attrs={"reduction": "top_k", "k": self.k,
                   "example": -1 if self.example is None else self.examples[0],
                   "description": f"per output step and feature, the {self.k} (input step, "
                                  f"input feature) pairs of largest {score}"})


def _add_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b for arrays that differ in width along axis 2 (missing steps are zero)."""
    if a.shape[2] < b.shape[2]:
        a, b = b, a
    a[:, :, :b.shape[2]] += b
    return a


class FeatureImportance(Accumulator):
    """Mean |J| (or J) per (output feature, input feature) over examples and steps."""

    def __init__(self, layout: Layout, absolute: bool = True,
                 example: int | None = None) -> None:
        self.layout, self.absolute, self.example = layout, bool(absolute), example
        self.examples = _examples(example, layout.batch)
        self.positions = (0, layout.n_out)
        self.steps = (0, layout.t_in)
        self.acc = np.zeros((layout.f_out, layout.f_in))

    def update(self, e0: int, p0: int, t0: int, data: np.ndarray) -> None:
        self.acc += _prepare(data, self.absolute).sum(axis=(0, 1, 3))

    def result(self) -> xarray.DataArray:
        import xarray as xr

        lay = self.layout
        n = (self.examples[1] - self.examples[0]) * lay.n_out * lay.t_in
        what = "|J|" if self.absolute else "J"
        return xr.DataArray(
            self.acc / n, dims=("out_feature", "in_feature"),
            coords={"out_feature": np.arange(lay.f_out), "in_feature": np.arange(lay.f_in)},
            name="importance",
            attrs={"reduction": "feature_importance", "values": what,
                   "example": -1 if self.example is None else self.examples[0],
                   "description": f"mean {what} over examples, output steps and input steps"})


# --------------------------------------------------------------------------- feeding slabs
def _slab_ranges(lo: int, hi: int, step: int) -> Iterator[tuple[int, int]]:
    for a in range(lo, hi, step):
        yield a, min(a + step, hi)


def feed(source: Source, acc: Accumulator, slab_bytes: int | None = None) -> Any:
    """Read the region ``acc`` needs from ``source`` slab by slab; return ``acc.result()``.

    Output positions are the outer loop, so every example of a run of output
    positions is seen before the next run starts. For a causal Jacobian, input
    steps after a slab's last output step are not read: they are zero.
    """
    lay = source.layout
    slab_bytes = SLAB_BYTES if slab_bytes is None else slab_bytes
    (e_lo, e_hi), (p_lo, p_hi), (t_lo, t_hi) = acc.examples, acc.positions, acc.steps
    # One (example, output position) row of the region; slabs follow the store's
    # chunks, cut down (output positions first) until they fit in slab_bytes.
    row_bytes = lay.f_out * (t_hi - t_lo) * lay.f_in * source.itemsize
    rows_fit = max(1, slab_bytes // max(1, row_bytes))
    step_e = max(1, min(source.chunks[0], e_hi - e_lo))
    step_p = max(1, min(source.chunks[1], rows_fit // step_e))
    step_e = max(1, min(step_e, rows_fit // step_p))
    step_p = max(acc.align, step_p // acc.align * acc.align)
    for p0, p1 in _slab_ranges(p_lo, p_hi, step_p):
        t1 = t_hi
        if lay.causal:
            t1 = max(t_lo, min(t_hi, int(lay.out_steps[p1 - 1]) + 1))
        for e0, e1 in _slab_ranges(e_lo, e_hi, step_e):
            acc.update(e0, p0, t_lo, source.read((e0, e1), (p0, p1), (t_lo, t1)))
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


# --------------------------------------------------------------------------- reductions by name
def _build_window_sum(layout: Layout, **kw: Any) -> Accumulator:
    return WindowSum(layout, **kw)


def _build_influence_map(layout: Layout, reduce: str = "sum", absolute: bool = True,
                         example: int | None = None, bins: Any = None) -> Accumulator:
    _choice("reduce", reduce, ("sum", "max"))
    return Map(layout, reduce=reduce, absolute=absolute, example=example, bins=bins)


def _build_lag_profile(layout: Layout, absolute: bool = True) -> Accumulator:
    return LagProfile(layout, absolute=absolute)


def _build_top_k(layout: Layout, k: int = 5, example: int | None = None) -> Accumulator:
    return TopK(layout, k=k, example=example)


def _build_feature_importance(layout: Layout, absolute: bool = True,
                              example: int | None = None) -> Accumulator:
    return FeatureImportance(layout, absolute=absolute, example=example)


REDUCTIONS: dict[str, tuple[Callable[..., Accumulator], tuple[str, ...]]] = {
    "window_sum": (_build_window_sum, ("in_steps", "out_steps", "absolute", "example")),
    "influence_map": (_build_influence_map, ("reduce", "absolute", "example", "bins")),
    "lag_profile": (_build_lag_profile, ("absolute",)),
    "top_k": (_build_top_k, ("k", "example")),
    "feature_importance": (_build_feature_importance, ("absolute", "example")),
}


@dataclass(frozen=True)
class Reduction:
    """A named reduction and its arguments, e.g. ``Reduction("top_k", {"k": 3})``.

    Made by :func:`jacstream.analysis.reduction`; passed as
    ``jacstream.jacobian(..., reduce=...)``.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, layout: Layout) -> Accumulator:
        return REDUCTIONS[self.name][0](layout, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (slices become ``{"slice": [start, stop, step]}``)."""
        def enc(v: Any) -> Any:
            if isinstance(v, slice):
                return {"slice": [v.start, v.stop, v.step]}
            if isinstance(v, tuple):
                return [enc(x) for x in v]
            if isinstance(v, np.generic):
                return v.item()
            return v
        return {"name": self.name, "kwargs": {k: enc(v) for k, v in sorted(self.kwargs.items())}}


def as_reduction(spec: Any) -> Reduction:
    """Check a ``reduce=`` argument: a name, a :class:`Reduction`, or ``(name, kwargs)``."""
    names = ", ".join(map(repr, REDUCTIONS))
    if isinstance(spec, str):
        spec = Reduction(spec)
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        spec = Reduction(spec[0], dict(spec[1]))
    elif not isinstance(spec, Reduction):
        raise InputError(f"reduce must be the name of a reduction ({names}) or "
                         f"jacstream.analysis.reduction(name, **kwargs); got {spec!r}.")
    if spec.name not in REDUCTIONS:
        raise InputError(f"reduce={spec.name!r} is not a reduction; choose one of {names}.")
    allowed = REDUCTIONS[spec.name][1]
    unknown = sorted(set(spec.kwargs) - set(allowed))
    if unknown:
        raise InputError(f"the reduction {spec.name!r} takes no argument {unknown[0]!r}; its "
                         f"arguments are {', '.join(allowed)}.")
    return spec


# --------------------------------------------------------------------------- streaming
class _Sink:
    """Stands in for a JobStore in the local executor: blocks go to an accumulator."""

    def __init__(self, acc: Accumulator, path: Path | None) -> None:
        self.acc = acc
        self.path = path if path is not None else Path("<memory>")

    def done_blocks(self) -> set[int]:
        return set()

    def write_block(self, plan: Plan, block: Block, data: np.ndarray,
                    durable: bool = True) -> None:
        update_cropped(self.acc, block.examples, block.positions, 0, data)


def run_streaming(reduction: Reduction, plan: Plan, inputs: Any, compute: Any,
                  path: Path | None, job: dict[str, Any], *, overwrite: bool, progress: bool,
                  on_nonfinite: str, on_block: Any, t_out: int) -> Any:
    """Compute the blocks of ``plan`` and reduce them on the fly; save and return the result.

    The full Jacobian is never stored. The result (an xarray object) is saved as
    a small zarr store at ``path`` (unless ``path`` is None); calling again with
    the same job and reduction loads it instead of computing it again.
    """
    import time

    from ._execute import run_local
    from ._store import describe_differences

    layout = Layout(plan.shape, np.asarray(plan.out_steps), plan.causal)
    acc = reduction.build(layout)
    if acc.align > 1 and plan.block_size % acc.align:
        raise InputError(f"reduce={reduction.name!r} with a max over windows of {acc.align} "
                         f"output steps needs block_size to be a multiple of {acc.align} (it "
                         f"is {plan.block_size}). Pass block_size, or use reduce='sum'.")
    meta = {**{k: v for k, v in job.items() if k != "model_rewrites"},
            "reduction": reduction.to_dict(), "plan": plan.to_dict()}
    if path is not None and path.exists():
        try:
            old = load_reduced(path)
        except NotAStoreError:
            old = None
        if old is not None and not overwrite:
            stored = json.loads(old.attrs["jacstream"])
            diffs = describe_differences(stored, meta)
            if stored.get("reduction") != meta["reduction"]:
                diffs.append(f"reduction: store has {stored.get('reduction')}, this call has "
                             f"{meta['reduction']}")
            if not diffs:
                return old
            raise StoreMismatchError(
                f"{str(path)!r} holds a reduced result of another job:\n  - "
                + "\n  - ".join(diffs) + "\nPass overwrite=True to replace it, or choose "
                "another path.")
        if old is None and not overwrite:
            raise StoreMismatchError(f"{str(path)!r} already exists. Pass overwrite=True to "
                                     "replace it, or choose another path.")
        if old is None and path.is_dir() and any(path.iterdir()) and not (
                path / "zarr.json").exists():
            raise StoreError(f"refusing to overwrite {str(path)!r}: it is a non-empty directory "
                             "that is not a zarr store. Remove it yourself or choose another "
                             "path.")
    t0 = time.perf_counter()
    stats = run_local(plan, _Sink(acc, path), inputs, compute,  # type: ignore[arg-type]
                      progress=progress, on_nonfinite=on_nonfinite, on_block=on_block,
                      t_out=t_out)
    result = acc.result()
    meta["run"] = {"wall_seconds": round(time.perf_counter() - t0, 3),
                   "compute_seconds": round(stats.compute_seconds, 3),
                   "blocks_computed": len(stats.computed_blocks),
                   "nonfinite_blocks": stats.nonfinite_blocks}
    result.attrs["jacstream"] = json.dumps(meta)
    if path is not None:
        save_reduced(result, path)
    return result


def save_reduced(result: Any, path: Path) -> None:
    """Write a reduced result as a zarr store, atomically (temporary directory, rename)."""
    import xarray as xr

    if isinstance(result, xr.DataArray):
        ds = result.to_dataset(name=result.name or "result")
        ds.attrs = {**result.attrs, "jacstream_kind": "DataArray"}
    else:
        ds = result.assign_attrs(jacstream_kind="Dataset")
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        ds.to_zarr(str(tmp), mode="w", consolidated=False)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else os.remove(path)
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"cannot write the reduced result to {str(path)!r}: {e}") from e


def load_reduced(path: str | os.PathLike[str]) -> Any:
    """Open a reduced result saved by ``jacstream.jacobian(..., reduce=...)``."""
    import xarray as xr
    import zarr

    p = Path(path)
    try:   # the group's attributes first: listing a full Jacobian store is not needed
        attrs = dict(zarr.open_group(str(p), mode="r").attrs)
    except Exception as e:
        raise NotAStoreError(f"{str(p)!r} is not a reduced result written by jacstream "
                             f"({type(e).__name__}: {e}).") from None
    if attrs.get("jacstream_kind") not in ("DataArray", "Dataset"):
        hint = (" It is a full Jacobian store: open it with jacstream.open()."
                if isinstance(attrs.get("jacstream"), dict) else "")
        raise NotAStoreError(f"{str(p)!r} is a zarr store but not a reduced result written by "
                             f"jacstream.jacobian(..., reduce=...).{hint}")
    ds = xr.open_zarr(str(p), consolidated=False)
    ds = ds.load()
    if ds.attrs.get("jacstream_kind") == "DataArray":
        (name,) = ds.data_vars
        out = ds[name]
        out.attrs = {k: v for k, v in ds.attrs.items() if k != "jacstream_kind"}
        return out
    ds.attrs.pop("jacstream_kind", None)
    return ds

