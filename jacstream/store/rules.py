"""What jacstream may write where: the one copy of the refuse-to-overwrite rules.

jacstream writes a store (full or reduced) only into a new path, an empty
directory, or a zarr store; it replaces an existing store only with
``overwrite=True``, and never replaces anything else (a file, a directory of
other things), whatever ``overwrite`` says. No TensorFlow here.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import NotAStoreError, StoreMismatchError

__all__ = ["is_new", "is_zarr_store", "refuse_existing", "refuse_foreign"]


def is_zarr_store(path: Path) -> bool:
    """Whether ``path`` is a zarr store (a directory with ``zarr.json``)."""
    return path.exists() and (path / "zarr.json").exists()


def is_new(path: Path) -> bool:
    """A path that does not exist yet, or an empty directory: a new store goes there."""
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def refuse_foreign(path: Path) -> None:
    """Raise NotAStoreError for a file or a non-empty directory that is not a zarr store."""
    if is_new(path) or is_zarr_store(path):
        return
    if not path.is_dir():
        raise NotAStoreError(
            f"store={str(path)!r} is a file, not a jacstream store. Pass the path of a new "
            "directory (it is created) or of a store written by jacstream.jacobian().")
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(map(repr, names[:4])) + (", ..." if len(names) > 4 else "")
    raise NotAStoreError(
        f"store={str(path)!r} is a directory that is not a jacstream store (it holds "
        f"{shown}). jacstream writes only into a new or empty directory or a store of its "
        "own, and never replaces anything else, even with overwrite=True. Choose a new "
        "path.")


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Raise unless a store may be written at ``path``: new, or a zarr store and ``overwrite``."""
    refuse_foreign(path)
    if not is_new(path) and not overwrite:
        raise StoreMismatchError(f"{str(path)!r} already exists. Pass overwrite=True to "
                                 "replace it, or choose another path.")
