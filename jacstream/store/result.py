"""The result object: a lazy, NumPy-indexable view of a Jacobian store."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import IncompleteStoreWarning
from ..planning import LAYOUT, Plan, format_bytes
from .jobstore import DESCRIPTION, JobStore, coordinates

if TYPE_CHECKING:
    import dask.array
    import xarray
    import zarr

__all__ = ["Jacobian", "open"]


class Jacobian:
    """A per-example Jacobian held in a zarr store on disk.

    ``J[i, a, f1, t2, f2] = d y[i, out_steps[a], f1] / d x[i, t2, f2]``: the layout
    of ``tf.GradientTape.batch_jacobian``, restricted to the selected output
    steps. Indexing with NumPy basic or orthogonal indices reads only the chunks
    it needs and returns a NumPy array.

    Examples
    --------
    >>> import jacstream, numpy as np, tempfile, os
    >>> f = lambda x: x ** 2
    >>> x = np.ones((2, 5, 1), dtype="float32")
    >>> path = os.path.join(tempfile.mkdtemp(), "j.zarr")
    >>> J = jacstream.jacobian(f, x, path, progress=False)
    >>> J.shape
    (2, 5, 1, 5, 1)
    >>> float(J[0, 3, 0, 3, 0])
    2.0
    """

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self.stats: dict[str, Any] = {}

    # -- identity ---------------------------------------------------------
    @property
    def path(self) -> Path:
        """Where the store lives."""
        return self._store.path

    @property
    def array(self) -> zarr.Array:
        """The underlying ``zarr.Array``."""
        return self._store.array

    @property
    def attrs(self) -> dict[str, Any]:
        """The job metadata recorded in the store (layout, shapes, fingerprints, runs)."""
        return self._store.meta

    @property
    def plan(self) -> Plan:
        """The plan the store was written with."""
        return self._store.plan

    @property
    def out_steps(self) -> np.ndarray:
        """Output timestep of each index along axis 1."""
        return np.asarray(self.plan.out_steps)

    @property
    def in_steps(self) -> np.ndarray:
        """Input timestep of each index along axis 3 (``arange(T_in)``)."""
        return np.arange(self.shape[3])

    @property
    def causal(self) -> bool:
        """Whether the zero upper triangle was skipped (see :func:`jacstream.jacobian`)."""
        return bool(self.attrs.get("causal"))

    @property
    def dims(self) -> tuple[str, ...]:
        return LAYOUT

    # -- completion -------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return self.plan.n_blocks

    @property
    def blocks_done(self) -> int:
        """How many blocks are finished and recorded."""
        return len(self._store.done_blocks())

    @property
    def complete(self) -> bool:
        """True when every block is in the store."""
        return self.blocks_done >= self.n_blocks

    # -- array protocol ---------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return 5

    @property
    def nbytes(self) -> int:
        """Bytes of the full tensor if read densely."""
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def nbytes_stored(self) -> int:
        """Bytes the store takes on disk (chunks skipped or compressed take less)."""
        return self._store.nbytes_stored()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.array.oindex[key] if _is_orthogonal(key) else self.array[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = np.asarray(self.array[...])
        return a if dtype is None else a.astype(dtype)

    def block_mask(self) -> np.ndarray:
        """Boolean (example_blocks, step_blocks) grid: which blocks are finished.

        Step blocks run over output steps, or over input steps for a forward-mode
        plan (``plan.axis == "in"``).
        """
        plan = self.plan
        mask = np.zeros((plan.n_step_blocks, plan.n_example_blocks), bool)
        for i in self._store.done_blocks():
            mask[divmod(i, plan.n_example_blocks)] = True
        return mask.T

    # -- views ------------------------------------------------------------
    def to_dask(self) -> dask.array.Array:
        """A dask array over the store, one dask chunk per zarr chunk."""
        import dask.array as da

        return da.from_zarr(self.array)

    def to_xarray(self) -> xarray.DataArray:
        """A lazy ``xarray.DataArray`` with named dims and real timestep coordinates.

        The store holds the same coordinates, so ``xarray.open_zarr(path)["jacobian"]``
        gives this view without jacstream (stores written since format 2).
        """
        import xarray as xr

        return xr.DataArray(self.to_dask(), dims=LAYOUT, coords=coordinates(self.plan),
                            name="jacobian", attrs={"description": DESCRIPTION})

    def summary(self) -> str:
        """A few lines on shape, completion, size on disk and timing."""
        meta = self.attrs
        runs = meta.get("runs", [])
        secs = sum(r.get("wall_seconds", 0.0) for r in runs)
        stored = self.nbytes_stored
        lines = [
            f"jacstream store {str(self.path)!r}",
            f"  shape        {self.shape}  ({', '.join(LAYOUT)})",
            f"  dtype        {self.dtype}",
            f"  output steps {len(self.out_steps)} of {meta['output_shape'][1]}"
            f" ({self.out_steps[0]}..{self.out_steps[-1]})",
            f"  blocks       {self.blocks_done} / {self.n_blocks} done"
            f"{'' if self.complete else '  (INCOMPLETE: run jacstream.jacobian again to resume)'}",
            f"  causal       {meta.get('causal')} ({meta.get('causal_reason', '')})",
            f"  strategy     {self.plan.strategy}",
            f"  on disk      {format_bytes(stored)} of {format_bytes(self.nbytes)} dense "
            f"({stored / max(1, self.nbytes):.1%})",
            f"  compute time {secs:.1f} s over {len(runs)} run(s)",
        ]
        if runs and runs[-1].get("peak_rss_increase") is not None:
            lines.append(f"  peak memory  {format_bytes(runs[-1]['peak_rss_increase'])} above "
                         f"the start of the last run (estimated "
                         f"{format_bytes(self.plan.estimated_peak)})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{self.blocks_done}/{self.n_blocks} blocks"
        return (f"<jacstream.Jacobian shape={self.shape} dtype={self.dtype} {state} "
                f"path={str(self.path)!r}>")


def _is_orthogonal(key: Any) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (list, np.ndarray)) for k in keys)


def open(store: str | os.PathLike[str]) -> Jacobian:  # noqa: A001
    """Open a Jacobian store written by :func:`jacstream.jacobian`.

    Warns with :class:`~jacstream.errors.IncompleteStoreWarning` when the run
    that wrote it did not finish; finished blocks can still be read.

    Parameters
    ----------
    store : str or path
        Path of the store.

    Returns
    -------
    Jacobian

    Examples
    --------
    >>> import jacstream, numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "j.zarr")
    >>> _ = jacstream.jacobian(lambda x: 3 * x, np.ones((1, 4, 1), "float32"), path,
    ...                        progress=False)
    >>> jacstream.open(path).shape
    (1, 4, 1, 4, 1)
    """
    result = Jacobian(JobStore.open(store, mode="r"))
    if not result.complete:
        warnings.warn(
            f"the store {str(store)!r} is incomplete: {result.blocks_done} of {result.n_blocks} "
            "blocks are finished (the run was interrupted). Finished blocks can be read; the "
            "others read as zeros. Call jacstream.jacobian() again with the same arguments to "
            "finish it.", IncompleteStoreWarning, stacklevel=2)
    return result
