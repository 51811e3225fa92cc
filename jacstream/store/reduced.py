"""The reduced store: a reduction's result (an xarray object) saved as a small zarr store.

Written by ``jacstream.jacobian(..., reduce=...)``, read by
:func:`jacstream.analysis.open_reduced`. No TensorFlow here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import NotAStoreError, StoreError
from .jobstore import consolidating

__all__ = ["load_reduced", "save_reduced"]


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
        with consolidating():   # so that xarray.open_zarr(path) reads it without a warning
            ds.to_zarr(str(tmp), mode="w", consolidated=True)
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
        group = zarr.open_group(str(p), mode="r")
        attrs = dict(group.attrs)
    except Exception as e:
        raise NotAStoreError(f"{str(p)!r} is not a reduced result written by jacstream "
                             f"({type(e).__name__}: {e}).") from None
    if attrs.get("jacstream_kind") not in ("DataArray", "Dataset"):
        hint = (" It is a full Jacobian store: open it with jacstream.open()."
                if isinstance(attrs.get("jacstream"), dict) else "")
        raise NotAStoreError(f"{str(p)!r} is a zarr store but not a reduced result written by "
                             f"jacstream.jacobian(..., reduce=...).{hint}")
    # consolidated since the stores of format 2; earlier ones are read without it
    ds = xr.open_zarr(str(p), consolidated=group.metadata.consolidated_metadata is not None)
    ds = ds.load()
    if ds.attrs.get("jacstream_kind") == "DataArray":
        (name,) = ds.data_vars
        out = ds[name]
        out.attrs = {k: v for k, v in ds.attrs.items() if k != "jacstream_kind"}
        return out
    ds.attrs.pop("jacstream_kind", None)
    return ds
