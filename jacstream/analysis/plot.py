"""Pictures of a Jacobian, drawn with matplotlib's Agg backend and saved as PNG.

Figures are made with :class:`matplotlib.figure.Figure` directly, not pyplot:
no window opens, no global backend changes and no figure is left registered.
Large Jacobians are aggregated before drawing (at most ``max_pixels`` cells per
axis), so a T = 10,000 heatmap draws a million cells, not 10^8.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from .accumulators import LagMap, Map
from .source import as_source, feed

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["heatmap", "lag_profile"]

# How far below the largest value a log colour (or y) scale reaches by default.
LOG_RANGE = 1e-8


def _figure(size: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str] | None) -> None:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=150)


def _edges(centres: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cell edges for cells that begin at ``centres[starts]``: halfway between steps."""
    c = np.asarray(centres, dtype=float)
    if len(c) == 1:
        mids = np.array([c[0] - 0.5, c[0] + 0.5])
    else:
        mids = np.concatenate([[c[0] - (c[1] - c[0]) / 2], (c[1:] + c[:-1]) / 2,
                               [c[-1] + (c[-1] - c[-2]) / 2]])
    return mids[np.append(starts, len(c))]


def heatmap(J: Any, example: int = 0, out_feature: int = 0, in_feature: int = 0, *,
            log: bool = False, path: str | os.PathLike[str] | None = None,
            max_pixels: int = 1000, absolute: bool = True, diagonal: bool = True,
            out_steps: slice | None = None, in_steps: slice | None = None,
            max_lag: int | None = None) -> Figure:
    """Heatmap of output step x input step (or x lag) for one example and pair of features.

    Each cell shows ``|J[example, t1, out_feature, t2, in_feature]|``. When the
    map has more than ``max_pixels`` steps along an axis, consecutive steps are
    aggregated into blocks and each cell shows the block's largest ``|J|``, so
    a single strong entry is never averaged away. ``out_steps`` and ``in_steps``
    zoom in on a window; ``max_lag`` draws ``t1`` against the lag ``t1 - t2``
    (``0..max_lag``) instead, the band along the diagonal where a causal model's
    Jacobian lives. Only the stored chunks in the window are read.

    Parameters
    ----------
    J : Jacobian or array
        ``(example, out_step, out_feature, in_step, in_feature)``.
    example, out_feature, in_feature : int
        Which slice to draw.
    log : bool
        Logarithmic colour scale, reaching 1e-8 of the largest value; exact
        zeros (the upper triangle of a causal model) are drawn in light grey.
    path : str or path, optional
        Save the figure there as PNG.
    max_pixels : int
        At most this many cells per axis.
    absolute : bool
        Draw ``|J|`` (default) or the signed ``J`` on a diverging scale (a
        block then shows its entry of largest magnitude, with its sign).
    diagonal : bool
        Draw the line ``t1 = t2`` (where a causal model's nonzero part ends).
    out_steps : slice, optional
        Output steps to draw, by step number: ``slice(100, 200)`` is steps
        100..199 (of those the Jacobian holds).
    in_steps : slice, optional
        Input steps to draw, e.g. ``slice(50, 200)``.
    max_lag : int, optional
        Draw lags ``0..max_lag`` (columns) instead of input steps; a cell with
        no input step (``t1 - lag < 0``) is left white.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from jacstream import plot
    >>> J = np.tril(np.ones((50, 50)))[None, :, None, :, None]
    >>> fig = plot.heatmap(J, log=True)
    >>> fig.axes[0].get_xlabel()
    'input step t2'
    >>> fig = plot.heatmap(J, out_steps=slice(20, 40), max_lag=5)
    >>> fig.axes[0].get_xlabel()
    'lag t1 - t2'
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise InputError(f"max_pixels must be a positive int; got {max_pixels!r}.")
    if max_lag is not None and in_steps is not None:
        raise InputError("in_steps= and max_lag= both choose the input steps to draw "
                         "(max_lag=L draws the input steps t1 - L..t1 of each output step "
                         "t1): pass one of them.")
    source = as_source(J)
    lay = source.layout
    window = _out_window(lay.out_steps, out_steps)
    n_out = window[1] - window[0]
    reduce = "max" if absolute else "extreme"
    what: dict[str, Any] = dict(absolute=absolute, example=example, out_feature=out_feature,
                                in_feature=in_feature, out_window=window)
    if max_lag is None:
        steps = _in_window(lay.t_in, in_steps)
        bins = (-(-n_out // max_pixels), -(-(steps[1] - steps[0]) // max_pixels))
        grid = Map(lay, reduce, bins=bins, in_window=steps, **what)
        acc: Map | LagMap = grid
        columns, starts = np.arange(*steps), grid.ax_in.edges[:-1] - steps[0]
    else:
        acc = LagMap(lay, max_lag, reduce, bins=(-(-n_out // max_pixels),
                                                 -(-(max_lag + 1) // max_pixels)), **what)
        columns, starts = np.arange(max_lag + 1), acc.ax_lag.edges[:-1]
        bins = (int(acc.ax_out.edges[1] - acc.ax_out.edges[0]) if acc.ax_out.n > 1 else 1,
                int(acc.ax_lag.edges[1] - acc.ax_lag.edges[0]) if acc.ax_lag.n > 1 else 1)
    values = np.asarray(feed(source, acc).values)
    x = _edges(columns, starts)
    y = _edges(lay.out_steps[window[0]:window[1]], acc.ax_out.edges[:-1] - window[0])
    fig, ax = _draw_map(x, y, values, log=log, absolute=absolute)
    if max_lag is None and diagonal:
        lo, hi = max(x[0], y[0]), min(x[-1], y[-1])
        if hi > lo:
            ax.plot([lo, hi], [lo, hi], ls="--", lw=0.8, color="0.55", label="t1 = t2")
            ax.legend(loc="lower right", fontsize="small", framealpha=0.8)
    ax.set_xlabel("input step t2" if max_lag is None else "lag t1 - t2")
    ax.set_ylabel("output step t1")
    sym = "|J|" if absolute else "J"
    bar = "|" if absolute else ""
    t2 = "t2" if max_lag is None else "t1 - lag"
    title = (f"{sym} = {bar}∂y[t1, {acc.f1.start}] / ∂x[{t2}, {acc.f2.start}]{bar}, "
             f"example {acc.examples[0]}")
    if (n_out, len(columns)) != (lay.n_out, lay.t_in) or max_lag is not None:
        title += (f"\noutput steps {y[0] + 0.5:.0f}..{y[-1] - 0.5:.0f}, "
                  + (f"input steps {columns[0]}..{columns[-1]}" if max_lag is None
                     else f"lags 0..{max_lag}"))
    if bins != (1, 1):
        kind = "max |J|" if absolute else "entry of largest |J|"
        title += (f"\n{kind} over blocks of {bins[0]} x {bins[1]} steps "
                  f"({n_out} x {len(columns)} steps in all)")
    ax.set_title(title, fontsize="medium")
    _save(fig, path)
    return fig


def _out_window(out_steps: np.ndarray, spec: slice | None) -> tuple[int, int]:
    """The output positions ``[a, b)`` whose step numbers ``spec`` selects."""
    if spec is None:
        return 0, len(out_steps)
    if not isinstance(spec, slice):
        raise InputError(f"out_steps must be a slice of output step numbers, e.g. "
                         f"slice(100, 200); got {spec!r}.")
    lo, hi, step = spec.indices(int(out_steps.max()) + 1)
    pos = np.nonzero((out_steps >= lo) & (out_steps < hi))[0]
    if step != 1 or len(pos) == 0:
        raise InputError(f"out_steps={spec!r} selects no output step of this Jacobian (steps "
                         f"{out_steps[0]}..{out_steps[-1]}, {len(out_steps)} of them); pass a "
                         "slice with step 1 that overlaps them.")
    return int(pos[0]), int(pos[-1]) + 1


def _in_window(t_in: int, spec: slice | None) -> tuple[int, int]:
    if spec is None:
        return 0, t_in
    if not isinstance(spec, slice):
        raise InputError(f"in_steps must be a slice of input steps, e.g. slice(0, 50); got "
                         f"{spec!r}.")
    lo, hi, step = spec.indices(t_in)
    if step != 1 or hi <= lo:
        raise InputError(f"in_steps={spec!r} selects no input step of 0..{t_in - 1}; pass a "
                         "slice with step 1 that overlaps them.")
    return lo, hi


def _draw_map(x: np.ndarray, y: np.ndarray, values: np.ndarray, *, log: bool,
              absolute: bool) -> tuple[Figure, Any]:
    """The map itself, its colour bar, and white where a cell has no entry (NaN)."""
    from matplotlib import colors

    finite = values[np.isfinite(values)]
    vmax = float(np.max(np.abs(finite))) if finite.size else 0.0
    vmax = vmax if vmax > 0 else 1.0
    data: Any = np.ma.masked_invalid(values)
    if absolute:
        cmap = _cmap("magma")
        if log:
            data = np.ma.masked_where(~(values > 0), values)
            norm: Any = colors.LogNorm(vmin=vmax * LOG_RANGE, vmax=vmax, clip=True)
        else:
            norm = colors.Normalize(vmin=0.0, vmax=vmax)
    else:
        cmap = _cmap("RdBu_r")
        norm = (colors.SymLogNorm(linthresh=vmax * 1e-4, vmin=-vmax, vmax=vmax) if log
                else colors.Normalize(vmin=-vmax, vmax=vmax))
    fig = _figure((7.0, 6.0))
    ax = fig.add_subplot()
    image = ax.pcolorfast(x, y, data, cmap=cmap, norm=norm)
    if np.isnan(values).any():   # no entry there (before the first input step): white
        ax.pcolorfast(x, y, np.ma.masked_where(~np.isnan(values), np.ones(values.shape)),
                      cmap=colors.ListedColormap(["white"]))
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(y[0], y[-1])
    label = ("|J|" if absolute else "J") + (" (log scale)" if log else "")
    if log and absolute and np.any(values <= 0):
        label += "; grey: exactly 0"
    fig.colorbar(image, ax=ax, label=label)
    return fig, ax


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="0.9")


def lag_profile(J: Any, *, path: str | os.PathLike[str] | None = None, log: bool = True,
                max_lag: int | None = None, share: float = 0.9) -> Figure:
    """Plot mean |J| against the lag ``t1 - t2``, with its spread across examples.

    Draws the mean over examples (line), its spread across examples (band:
    plus or minus one standard deviation, or on a log axis the range from the
    smallest to the largest example), each example (thin lines, up to 20), and
    the lag within which a fraction ``share`` of the total ``|J|`` lies: how far
    back the model looks.

    Parameters
    ----------
    J : Jacobian, array or xarray.Dataset
        A Jacobian, or the result of :func:`jacstream.analysis.lag_profile`.
    path : str or path, optional
        Save the figure there as PNG.
    log : bool
        Logarithmic y axis (gradients usually decay exponentially with lag).
    max_lag : int, optional
        Draw lags up to this one only.
    share : float
        Mark the lag within which this fraction of the total ``|J|`` lies.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from jacstream import plot
    >>> t = np.arange(40)
    >>> J = np.tril(0.8 ** (t[:, None] - t[None, :]))[None, :, None, :, None]
    >>> fig = plot.lag_profile(J)
    >>> fig.axes[0].get_xlabel()
    'lag t1 - t2 (output step - input step)'
    """
    from .. import analysis

    if not (isinstance(share, (int, float)) and 0 < share <= 1):
        raise InputError(f"share must be a fraction in (0, 1], e.g. 0.9; got {share!r}.")
    prof = J if hasattr(J, "data_vars") and "mean" in J.data_vars else analysis.lag_profile(J)
    lags = prof["lag"].values
    mean, std = prof["mean"].values, prof["std"].values
    per_example = prof["per_example"].values
    count = prof["count"].values
    reach = _reach(lags, mean * count, share)
    keep = np.ones(len(lags), bool)
    if np.all(mean[lags < 0] == 0):   # a causal model: nothing to see at negative lags
        keep &= lags >= 0
    if max_lag is not None:
        keep &= lags <= max_lag
    if not keep.any():
        raise InputError(f"no lag to draw (lags {lags.min()}..{lags.max()}, max_lag={max_lag}).")
    lags, mean, std, per_example, count = (lags[keep], mean[keep], std[keep],
                                           per_example[:, keep], count[keep])

    what = prof.attrs.get("values", "|J|")
    fig = _figure((7.5, 4.8))
    ax = fig.add_subplot()
    floor = float(np.max(mean)) * LOG_RANGE if log and np.max(mean) > 0 else None
    n_ex = per_example.shape[0]
    if 1 < n_ex <= 20:
        for i, row in enumerate(per_example):
            ax.plot(lags, _floor(row, floor), lw=0.6, color="0.6", alpha=0.7,
                    label="each example" if i == 0 else None)
    if n_ex > 1 and log:   # mean - std is often negative: show the range on a log axis
        ax.fill_between(lags, _floor(per_example.min(axis=0), floor), per_example.max(axis=0),
                        color="C0", alpha=0.2, lw=0, label="range across examples")
    elif n_ex > 1:
        ax.fill_between(lags, mean - std, mean + std, color="C0", alpha=0.25, lw=0,
                        label="mean ± 1 std across examples")
    ax.plot(lags, _floor(mean, floor), color="C0", lw=1.8, label="mean over examples")
    if reach is not None:
        where = " at lags ≥ 0" if lags[0] < 0 else ""
        off = " (off the chart)" if reach > lags[-1] else ""
        ax.axvline(reach, color="C3", ls="--", lw=1.0,
                   label=f"{share:.0%} of total {what}{where} within lag ≤ {reach}{off}")
    if log:
        ax.set_yscale("log")
    right = lags[-1]
    if floor is not None and max_lag is None and np.any(mean > floor):
        # Past the last lag above the floor the log axis is empty: stop there, and say so.
        last = int(lags[mean > floor][-1])
        if last < lags[-1]:
            right = min(lags[-1], last + max(1, (last - lags[0]) // 20))
            ax.text(0.99, 0.02, f"beyond lag {last}: mean below {LOG_RANGE:.0e} of its peak",
                    transform=ax.transAxes, ha="right", va="bottom", fontsize="small",
                    color="0.3")
    ax.set_xlim(lags[0], right)
    ax.set_xlabel("lag t1 - t2 (output step - input step)")
    ax.set_ylabel(f"mean {what} over steps and features")
    ax.set_title(f"How far back the model looks: mean {what} by lag "
                 f"({n_ex} example{'s' if n_ex != 1 else ''})", fontsize="medium")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return fig


def _reach(lags: np.ndarray, mass: np.ndarray, share: float) -> int | None:
    """Smallest lag >= 0 within which ``share`` of the total mass at lags >= 0 lies."""
    pos = lags >= 0
    total = mass[pos].sum()
    if not total > 0:
        return None
    cum = np.cumsum(mass[pos]) / total
    return int(lags[pos][min(int(np.searchsorted(cum, share)), int(pos.sum()) - 1)])


def _floor(v: np.ndarray, floor: float | None) -> Any:
    """On a log axis, hide values at or below ``floor`` instead of plotting -inf."""
    return v if floor is None else np.ma.masked_less_equal(v, floor)
