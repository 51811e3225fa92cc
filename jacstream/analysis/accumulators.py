"""The accumulators: each reduction of :mod:`jacstream.analysis`, fed slabs in any order.

See :mod:`jacstream.analysis.source` for what a slab is. No TensorFlow here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, check_choice
from .source import Accumulator, Layout
from .windows import Axis, Op, bin_axis, make_axis

if TYPE_CHECKING:
    import xarray

__all__ = ["FeatureImportance", "LagMap", "LagProfile", "Map", "TopK", "WindowSum"]


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


def _bins(bins: Any) -> tuple[int | None, int | None]:
    """Pixels of ``bins``: None, one positive int, or a pair (rows, columns)."""
    pair = (bins, bins) if not isinstance(bins, tuple) else bins
    for b in pair:
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, np.integer))
                              or b < 1):
            raise InputError(f"bins must be None, a positive int or a pair of them (output "
                             f"steps, input steps) per pixel; got {bins!r}.")
    return pair[0], pair[1]


def _window_axis(b: int | None, lo: int, hi: int) -> Axis:
    """Indices ``[lo, hi)`` of an axis, in consecutive windows of ``b`` (kept if None or 1)."""
    return Axis(lo, hi, np.append(np.arange(lo, hi, int(b or 1)), hi))


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
        op = Op("sum")
        jo, v = bin_axis(v, 1, p0, self.ax_out, op)
        ji, v = bin_axis(v, 3, t0, self.ax_in, op)
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
    or averaged over examples; of every step, or of a window (``out_window``: output
    positions ``[a, b)``, ``in_window``: input steps), of which only the window is read."""

    def __init__(self, layout: Layout, reduce: str = "sum", absolute: bool = True,
                 example: int | None = None, out_feature: int | None = None,
                 in_feature: int | None = None, bins: Any = None,
                 out_window: tuple[int, int] | None = None,
                 in_window: tuple[int, int] | None = None) -> None:
        check_choice("reduce", reduce, ("sum", "max", "extreme"))
        self.layout, self.absolute, self.example = layout, bool(absolute), example
        self.op = Op(reduce)
        self.f1 = _feature(out_feature, layout.f_out, "out_feature")
        self.f2 = _feature(in_feature, layout.f_in, "in_feature")
        bo, bi = _bins(bins)
        self.positions = out_window or (0, layout.n_out)
        self.steps = in_window or (0, layout.t_in)
        self.ax_out = _window_axis(bo, *self.positions)
        self.ax_in = _window_axis(bi, *self.steps)
        self.examples = _examples(example, layout.batch)
        # A window's max is final only when all its rows are in one slab; sums add up.
        self.align = 1 if reduce == "sum" else int(bo or 1)
        # Entries past a slab's end are zero: a signed max over a window that reaches
        # past the end is at least 0 (a sum or an |J| max or an extreme is unchanged).
        self._zero_floor = reduce == "max" and not self.absolute
        self.acc = np.zeros((self.ax_out.n, self.ax_in.n))

    def update(self, e0: int, p0: int, t0: int, data: np.ndarray) -> None:
        if t0 != self.steps[0]:
            raise InputError(f"an influence map reads every input step of its window from "
                             f"{self.steps[0]}; got a slab from step {t0}.")
        v = self.op.reduce(_prepare(data[:, :, self.f1, :, self.f2], self.absolute), (2, 4))
        width = v.shape[2]
        ji, v = bin_axis(v, 2, t0, self.ax_in, self.op)          # (e, k, windows touched)
        full: np.ndarray = np.zeros(v.shape[:2] + (self.ax_in.n,))
        if self._zero_floor:
            full[...] = -np.inf
        full[:, :, ji:ji + v.shape[2]] = v
        if self._zero_floor:
            beyond = self.ax_in.edges[1:] > t0 + width
            full[:, :, beyond] = np.maximum(full[:, :, beyond], 0.0)
        jo, full = bin_axis(full, 1, p0, self.ax_out, self.op)
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


class LagMap(Accumulator):
    """An (output step x lag) map for lags ``0..max_lag``: ``J[e, t1, f1, t1 - lag, f2]``,
    features reduced, optionally binned, per example or averaged over examples.

    The natural view of a causal Jacobian's band along the diagonal: each slab of
    output steps reads only the ``max_lag + 1`` input steps behind it. A cell
    with no input step (``t1 - lag < 0``) is NaN.
    """

    def __init__(self, layout: Layout, max_lag: int, reduce: str = "max",
                 absolute: bool = True, example: int | None = None,
                 out_feature: int | None = None, in_feature: int | None = None,
                 bins: Any = None, out_window: tuple[int, int] | None = None) -> None:
        check_choice("reduce", reduce, ("max", "extreme"))
        if isinstance(max_lag, bool) or not isinstance(max_lag, (int, np.integer)) or \
                max_lag < 0:
            raise InputError(f"max_lag must be an int >= 0 (draw lags 0..max_lag); got "
                             f"{max_lag!r}.")
        self.layout, self.absolute, self.example = layout, bool(absolute), example
        self.max_lag, self.op = int(max_lag), Op(reduce)
        self.f1 = _feature(out_feature, layout.f_out, "out_feature")
        self.f2 = _feature(in_feature, layout.f_in, "in_feature")
        bo, bl = _bins(bins)
        self.positions = out_window or (0, layout.n_out)
        self.ax_out = _window_axis(bo, *self.positions)
        self.ax_lag = _window_axis(bl, 0, self.max_lag + 1)
        self.examples = _examples(example, layout.batch)
        self.steps = self.steps_for(layout, *self.positions)
        self.align = int(bo or 1)   # a row window's max is final within one slab
        self.acc = np.zeros((self.ax_out.n, self.ax_lag.n))

    def steps_for(self, lay: Layout, p0: int, p1: int) -> tuple[int, int]:
        s = lay.out_steps[p0:p1]
        return max(0, int(s.min()) - self.max_lag), min(lay.t_in, int(s.max()) + 1)

    def update(self, e0: int, p0: int, t0: int, data: np.ndarray) -> None:
        v = self.op.reduce(_prepare(data[:, :, self.f1, :, self.f2], self.absolute), (2, 4))
        k, width = v.shape[1], v.shape[2]
        if width == 0:
            return
        t1 = self.layout.out_steps[p0:p0 + k].astype(np.int64)
        idx = t1[:, None] - np.arange(self.max_lag + 1)[None, :] - t0      # (k, lags)
        ok = (idx >= 0) & (idx < width)
        g = np.where(ok, v[:, np.arange(k)[:, None], np.clip(idx, 0, width - 1)], 0.0)
        _, g = bin_axis(g, 2, 0, self.ax_lag, self.op)
        jo, g = bin_axis(g, 1, p0, self.ax_out, self.op)
        self.acc[jo:jo + g.shape[1]] += g.sum(axis=0)

    def result(self) -> xarray.DataArray:
        import xarray as xr

        steps = self.layout.out_steps
        last = steps[self.ax_out.edges[1:] - 1]         # a cell needs t1 - lag >= 0
        lags = self.ax_lag.edges[:-1]
        values = np.where(last[:, None] >= lags[None, :],
                          self.acc / (self.examples[1] - self.examples[0]), np.nan)
        what = "|J|" if self.absolute else "J"
        return xr.DataArray(
            values, dims=("out_step", "lag"),
            coords={"out_step": steps[self.ax_out.edges[:-1]], "lag": lags},
            name="influence",
            attrs={"reduction": "lag_map", "reduce": self.op.name, "values": what,
                   "example": -1 if self.example is None else self.examples[0],
                   "description": f"{self.op.name} of {what} over features, by output step "
                                  "and lag t1 - t2"})


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
            raise InputError(f"top_k: output positions {sorted(self._pending)} did not see "
                             "every example: feed every example of each output position.")
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
