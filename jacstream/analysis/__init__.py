"""Reading the answer: which inputs drove which outputs.

Each function takes a :class:`jacstream.Jacobian` (or any array in its layout
``(example, out_step, out_feature, in_step, in_feature)``: NumPy, zarr, dask,
or the DataArray of :meth:`jacstream.Jacobian.to_xarray`) and reads it slab by
slab, so memory stays bounded on a Jacobian larger than RAM: it holds a slab of
at most about 32 MiB (a few copies of it while reducing) plus the result. For a
causal Jacobian the zero upper triangle is never read. Results are xarray
objects whose coordinates hold the real timestep numbers; ``.values`` gives
the NumPy array.

The same reductions can run while the Jacobian is computed, storing only the
reduced result: ``jacstream.jacobian(model, x, path, reduce=...)`` with a name
or a :func:`reduction`.

Step windows (``in_steps``, ``out_steps`` of :func:`window_sum`) index the
array's axes as NumPy would: ``in_steps=slice(0, 10)`` is ``J[:, :, :, 0:10]``.
Along output steps they are positions among the computed output steps (the
step numbers themselves when every output step was computed).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import check_choice
from ..store.reduced import load_reduced
from . import accumulators as _acc
from .reductions import Reduction, as_reduction
from .source import as_source, feed

if TYPE_CHECKING:
    import xarray

__all__ = ["Reduction", "feature_importance", "influence_map", "lag_profile", "open_reduced",
           "reduction", "top_k", "window_sum"]


def window_sum(J: Any, in_steps: slice | int | None = None, out_steps: slice | int | None = None,
               *, absolute: bool = False, example: int | None = None) -> xarray.DataArray:
    """Sum J over a window of input steps and/or of output steps.

    ``window_sum(J, in_steps=slice(0, 10))`` is ``reduce_sum(J[:, :, :, :10], axis=3)``:
    the summed influence of the first ten input steps on every output.

    Parameters
    ----------
    J : Jacobian or array
        ``(example, out_step, out_feature, in_step, in_feature)``.
    in_steps, out_steps : slice, int or None
        A slice sums over that window and removes the axis; an int ``w`` sums
        over consecutive windows of ``w`` steps (axis ``in_window`` /
        ``out_window``, labelled by each window's first step); None keeps the
        axis. At least one of the two must be given.
    absolute : bool
        Sum ``|J|`` instead of ``J``.
    example : int, optional
        Only this example (the example axis is then removed).

    Returns
    -------
    xarray.DataArray
        ``J`` with the summed axes removed (or windowed), float64.

    Examples
    --------
    >>> import numpy as np
    >>> from jacstream import analysis
    >>> J = np.ones((2, 5, 1, 5, 1))
    >>> s = analysis.window_sum(J, in_steps=slice(0, 3))
    >>> s.dims, float(s[0, 4, 0, 0])
    (('example', 'out_step', 'out_feature', 'in_feature'), 3.0)
    >>> analysis.window_sum(J, in_steps=2, example=0).sizes["in_window"]
    3
    """
    source = as_source(J)
    acc = _acc.WindowSum(source.layout, in_steps=in_steps, out_steps=out_steps,
                            absolute=absolute, example=example)
    return feed(source, acc)


def influence_map(J: Any, reduce: str = "sum", absolute: bool = True,
                  example: int | None = None, *, bins: int | tuple[int, int] | None = None
                  ) -> xarray.DataArray:
    """Output step x input step map of influence, features reduced.

    ``map[t1, t2] = reduce over (f1, f2) of |J[i, t1, f1, t2, f2]|`` for one
    example, or its mean over examples.

    Parameters
    ----------
    J : Jacobian or array
        ``(example, out_step, out_feature, in_step, in_feature)``.
    reduce : {"sum", "max"}
        How output and input features are combined.
    absolute : bool
        Use ``|J|`` (default) or the signed ``J``.
    example : int, optional
        One example; by default the map is averaged over examples.
    bins : int or (int, int), optional
        Aggregate blocks of (output steps, input steps) into one cell with the
        same ``reduce`` (sum or max), for maps too large to hold or to draw.

    Returns
    -------
    xarray.DataArray
        Dims ``(out_step, in_step)``; with ``bins`` the coordinates are each
        cell's first step and ``out_step_last`` / ``in_step_last`` its last.

    Examples
    --------
    >>> import numpy as np
    >>> from jacstream import analysis
    >>> J = np.arange(2 * 3 * 1 * 4 * 2, dtype=float).reshape(2, 3, 1, 4, 2)
    >>> m = analysis.influence_map(J, reduce="max", example=1)
    >>> m.shape, float(m[2, 3])
    ((3, 4), 47.0)
    """
    check_choice("reduce", reduce, ("sum", "max"))
    source = as_source(J)
    acc = _acc.Map(source.layout, reduce=reduce, absolute=absolute, example=example,
                      bins=bins)
    return feed(source, acc)


def lag_profile(J: Any, *, absolute: bool = True) -> xarray.Dataset:
    """Mean |J| as a function of the lag ``t1 - t2``: how far back the model looks.

    For each example, the mean of ``|J[i, t1, f1, t2, f2]|`` over all output
    steps, input steps and features with ``t1 - t2 = lag``; then its mean and
    spread across examples. For a causal Jacobian only lags >= 0 are returned
    (the others are zero by construction).

    Parameters
    ----------
    J : Jacobian or array
        ``(example, out_step, out_feature, in_step, in_feature)``. For an array,
        output step numbers are the positions along axis 1 unless it is a
        DataArray with an ``out_step`` coordinate.
    absolute : bool
        Average ``|J|`` (default) or the signed ``J``.

    Returns
    -------
    xarray.Dataset
        ``mean`` and ``std`` (across examples) over ``lag``, ``per_example``
        over ``(example, lag)``, and ``count``, the entries averaged per lag.

    Examples
    --------
    >>> import numpy as np
    >>> from jacstream import analysis
    >>> J = np.tril(np.ones((4, 4)))[None, :, None, :, None]   # y[t] = sum of x[:t+1]
    >>> p = analysis.lag_profile(J)
    >>> p.lag.values.tolist(), p["mean"].values.tolist()[3:]
    ([-3, -2, -1, 0, 1, 2, 3], [1.0, 1.0, 1.0, 1.0])
    """
    source = as_source(J)
    return feed(source, _acc.LagProfile(source.layout, absolute=absolute))


def top_k(J: Any, k: int = 5, example: int | None = None) -> xarray.Dataset:
    """The k input (step, feature) pairs of largest |J| for every output step and feature.

    With ``example=None`` inputs are ranked by the mean of ``|J|`` over
    examples. Ties go to the earlier input step.

    Parameters
    ----------
    J : Jacobian or array
        ``(example, out_step, out_feature, in_step, in_feature)``.
    k : int
        How many inputs to keep per output step.
    example : int, optional
        Rank by this example's ``|J|`` instead of the mean over examples.

    Returns
    -------
    xarray.Dataset
        ``in_step``, ``in_feature`` and ``value`` (the score) over
        ``(out_step, out_feature, rank)``, rank 0 the largest.

    Examples
    --------
    >>> import numpy as np
    >>> from jacstream import analysis
    >>> J = np.zeros((1, 2, 1, 6, 1)); J[0, 1, 0, [2, 4], 0] = [0.5, -3.0]
    >>> t = analysis.top_k(J, k=2)
    >>> t.in_step.sel(out_step=1, out_feature=0).values.tolist()
    [4, 2]
    """
    source = as_source(J)
    return feed(source, _acc.TopK(source.layout, k=k, example=example))


def feature_importance(J: Any, *, absolute: bool = True,
                       example: int | None = None) -> xarray.DataArray:
    """Mean |J| per (output feature, input feature), over examples and all steps.

    Parameters
    ----------
    J : Jacobian or array
        ``(example, out_step, out_feature, in_step, in_feature)``.
    absolute : bool
        Average ``|J|`` (default) or the signed ``J``.
    example : int, optional
        Only this example; by default all of them.

    Returns
    -------
    xarray.DataArray
        Dims ``(out_feature, in_feature)``. Entries of a causal Jacobian's zero
        triangle count in the mean, so compare features, not models of
        different lengths.

    Examples
    --------
    >>> import numpy as np
    >>> from jacstream import analysis
    >>> J = np.ones((2, 3, 1, 3, 2)); J[..., 1] *= -4
    >>> analysis.feature_importance(J).values.tolist()
    [[1.0, 4.0]]
    """
    source = as_source(J)
    return feed(source, _acc.FeatureImportance(source.layout, absolute=absolute,
                                                          example=example))


def reduction(name: str, **kwargs: Any) -> Reduction:
    """A reduction to compute while the Jacobian is computed, instead of storing it.

    Pass it as ``jacstream.jacobian(model, x, path, reduce=...)``: every block
    is reduced as soon as it is computed and only the reduced result is kept
    (saved at ``path``, see :func:`open_reduced`). A plain name (e.g.
    ``reduce="lag_profile"``) uses the defaults.

    Parameters
    ----------
    name : {"window_sum", "influence_map", "lag_profile", "top_k", "feature_importance"}
        The function of this module to apply.
    **kwargs
        Its keyword arguments (``in_steps=slice(0, 10)``, ``k=3``...).

    Returns
    -------
    Reduction

    Examples
    --------
    >>> from jacstream import analysis
    >>> analysis.reduction("window_sum", in_steps=slice(0, 10))
    Reduction(name='window_sum', kwargs={'in_steps': slice(0, 10, None)})
    """
    return as_reduction(Reduction(name, dict(kwargs)))


def open_reduced(path: str | os.PathLike[str]) -> Any:
    """Open a reduced result saved by ``jacstream.jacobian(..., reduce=...)``.

    Returns the same xarray object the call returned; its
    ``attrs["jacstream"]`` holds the job and the reduction as JSON.

    Examples
    --------
    >>> from jacstream import analysis
    >>> profile = analysis.open_reduced("lags.zarr")            # doctest: +SKIP
    """
    return load_reduced(path)
