"""Storage: the zarr store of one Jacobian job, its metadata and completion records.

Layout of a store directory (format 2)::

    store.zarr/
      zarr.json                 group; attrs["jacstream"] holds the job metadata, and the
                                consolidated metadata of the arrays below
      jacobian/                 the (example, out_step, out_feature, in_step, in_feature) array
        zarr.json, c/...        its metadata (dimension_names) and chunks
        jacstream_blocks/       one small file per finished block: NNNNNNNN.done
        jacstream.lock          the writer lock (see :mod:`.lock`)
      example/ out_step/ out_feature/ in_step/ in_feature/
                                the coordinates, one 1-D int64 array each

So ``xarray.open_zarr(store)`` gives the labeled view of ``Jacobian.to_xarray()``
without jacstream, and zarr reads the store without a warning: jacstream's own
records sit inside the array's directory, where zarr never lists. Format 1
stores (markers in ``store.zarr/jacstream_blocks/``, no coordinate arrays) are
read as they are and upgraded by the next run that writes them.

A block counts as done only once its chunks are written and flushed to disk
(:mod:`.durable`) and its marker has been renamed into place, so an interrupted run never leaves a
half-written block that counts as done. No TensorFlow here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import zarr

from .._version import __version__
from ..errors import (
    NotAStoreError,
    ReadOnlyStoreError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    StoreWriteError,
    first_line,
)
from ..planning import LAYOUT, Block, Plan
from .chunks import chunk_files, direct_codec, write_chunks
from .dtypes import cast as _cast
from .dtypes import native_dtype, register_bfloat16
from .durable import sync_files
from .lock import WriterLock
from .rules import is_new, is_zarr_store, refuse_existing

# zstd's fast level: on a block of the reference model at T=3000 (7.7 MB, 83% zeros) it
# compressed 5.72x in 2.7 ms, zarr's default level 5.74x in 11.9 ms (numcodecs, one thread).
COMPRESSION_LEVEL = -1

__all__ = ["ARRAY_NAME", "DESCRIPTION", "JobStore", "consolidating", "coordinates",
           "describe_differences", "done_dir"]

ARRAY_NAME = "jacobian"
DONE_DIR = "jacstream_blocks"   # in the array's directory (format 1: at the top level)
DONE_SUFFIX = ".done"
LOCK_FILE = "jacstream.lock"    # in the array's directory
FORMAT = 2
DESCRIPTION = "d y[example, out_step, out_feature] / d x[example, in_step, in_feature]"

# Fields of the job identity: a store is reused only if all of them match.
IDENTITY = ("model", "inputs", "input_shape", "output_shape", "out_steps", "causal", "dtype",
            "layout")


def describe_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable list of the identity fields that differ."""
    out = []
    for key in IDENTITY:
        a, b = stored.get(key), wanted.get(key)
        if a != b:
            out.append(f"{key}: store has {_brief(a)}, this call has {_brief(b)}")
    return out


def _brief(v: Any) -> str:
    if isinstance(v, list) and len(v) > 6:
        return f"[{v[0]}, {v[1]}, ..., {v[-1]}] ({len(v)} items)"
    if isinstance(v, str) and len(v) == 64:
        return f"fingerprint {v[:12]}..."
    return repr(v)


def done_dir(path: str | os.PathLike[str]) -> Path:
    """The folder of a store's completion markers (a format 1 store keeps them at the top)."""
    p = Path(path)
    new, old = p / ARRAY_NAME / DONE_DIR, p / DONE_DIR
    return old if old.is_dir() and not new.exists() else new


def coordinates(plan: Plan) -> dict[str, np.ndarray]:
    """The coordinate of each axis of ``plan``'s array: the real step and feature numbers."""
    batch, _, f_out, t_in, f_in = plan.shape
    values = (range(batch), plan.out_steps, range(f_out), range(t_in), range(f_in))
    return {name: np.asarray(v, dtype=np.int64) for name, v in zip(LAYOUT, values, strict=True)}


def _write_coordinates(group: zarr.Group, plan: Plan) -> None:
    for name, values in coordinates(plan).items():
        coord = group.create_array(name, shape=values.shape, dtype=values.dtype,
                                   chunks=values.shape, fill_value=0, dimension_names=[name],
                                   overwrite=True)
        coord[...] = values


@contextlib.contextmanager
def consolidating() -> Iterator[None]:
    """Around writing consolidated metadata (which xarray looks for first, and warns when it is
    missing): without zarr's note that it is not yet in the zarr v3 specification."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not")
        yield


def _consolidate(path: Path) -> None:
    with consolidating():
        zarr.consolidate_metadata(str(path))


class JobStore:
    """A jacstream store on local disk."""

    def __init__(self, path: Path, group: zarr.Group, array: zarr.Array) -> None:
        self.path = path
        self.group = group
        self.array = array
        self.writer: WriterLock | None = None

    @property
    def _done_dir(self) -> Path:
        return done_dir(self.path)

    # -- opening ----------------------------------------------------------
    @staticmethod
    def exists(path: str | os.PathLike[str]) -> bool:
        return is_zarr_store(Path(path))

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: Literal["r", "r+"] = "r") -> JobStore:
        p = Path(path)
        if not p.exists():
            raise NotAStoreError(f"no jacstream store at {str(p)!r}: the path does not exist. "
                                 "Check the path, or compute one with jacstream.jacobian().")
        register_bfloat16()  # so that a bfloat16 store opens (zarr has no such dtype itself)
        try:
            group = zarr.open_group(store=str(p), mode=mode)
            meta = group.attrs.get("jacstream")
            if group.attrs.get("jacstream_kind") in ("DataArray", "Dataset"):
                raise NotAStoreError(
                    f"{str(p)!r} holds a reduced result (jacstream.jacobian(..., reduce=...)), "
                    "not a full Jacobian store. Open it with "
                    "jacstream.analysis.open_reduced(path).")
            array = group[ARRAY_NAME]
        except NotAStoreError:
            raise
        except Exception as e:
            raise NotAStoreError(
                f"{str(p)!r} is not a jacstream store ({type(e).__name__}: {first_line(e)}). "
                "Pass the path of a store written by jacstream.jacobian(), or a new path; "
                "jacstream never replaces a directory it did not write.") from None
        if not isinstance(meta, dict) or not isinstance(array, zarr.Array):
            raise NotAStoreError(f"{str(p)!r} is a zarr store but not a jacstream store (no "
                                 "'jacstream' metadata). Pass the path of a store written by "
                                 "jacstream.jacobian(), or a new path; jacstream never "
                                 "replaces a store it did not write.")
        return cls(p, group, array)

    @staticmethod
    def writable(path: str | os.PathLike[str]) -> bool:
        """Whether the store's directories and metadata can be written (os.access)."""
        p = Path(path)
        parts = [p, p / "zarr.json", p / ARRAY_NAME, p / ARRAY_NAME / "c", done_dir(p),
                 p / ARRAY_NAME / LOCK_FILE]
        return all(os.access(q, os.W_OK) for q in parts if q.exists())

    @staticmethod
    def check_creatable(path: str | os.PathLike[str]) -> None:
        """Raise unless a store can be made at ``path``: by trying, in its nearest existing parent.

        ``os.access`` alone says yes to root on a directory it cannot write (a
        read-only mount, /proc); a directory made and removed at once does not lie.
        """
        p = Path(path).absolute()
        anc = p.parent
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        if not anc.is_dir():
            raise StoreError(f"cannot create the store {str(path)!r}: {str(anc)!r} is a file, "
                             "not a directory. Choose a path inside a directory.")
        probe = anc / f".{p.name}.probe-{os.getpid()}"
        try:
            if not os.access(anc, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "permission denied")
            probe.mkdir()
            probe.rmdir()
        except OSError as e:
            raise ReadOnlyStoreError(
                f"cannot create the store {str(path)!r}: the directory {str(anc)!r} is not "
                f"writable ({e.strerror or e}). Choose a path on a writable disk, e.g. in your "
                "home or scratch directory.") from None

    @classmethod
    def create(cls, path: str | os.PathLike[str], plan: Plan, job: dict[str, Any],
               overwrite: bool = False) -> JobStore:
        p = Path(path)
        refuse_existing(p, overwrite)
        replacing = not is_new(p)
        cls.check_creatable(p)
        meta = {
            "format": FORMAT,
            "version": __version__,
            "layout": list(LAYOUT),
            **job,
            "shape": list(plan.shape),
            "chunks": list(plan.chunks),
            "plan": plan.to_dict(),
            "n_blocks": plan.n_blocks,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "runs": [],
        }
        # Built under a temporary name and renamed into place, so a run killed while
        # creating the store leaves no half-made store behind; a store being replaced
        # is moved aside first and deleted only once the new one is in place.
        tmp = p.with_name(f".{p.name}.creating-{os.getpid()}")
        old = p.with_name(f".{p.name}.replaced-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        writer = None
        try:
            _build(tmp, plan, meta)
            # Locked before it is in place, so no other writer can take it in between.
            writer = WriterLock.acquire(tmp / ARRAY_NAME / LOCK_FILE, p)
            if replacing:
                os.replace(p, old)
            os.replace(tmp, p)
        except OSError as e:
            if writer is not None:
                writer.release()
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not p.exists():
                os.replace(old, p)  # put the replaced store back
            if not replacing and e.errno in (errno.ENOTEMPTY, errno.EEXIST) and is_zarr_store(p):
                raise _made_meanwhile(p) from None
            raise StoreWriteError(f"cannot create the store {str(p)!r}: {e.strerror or e} "
                                  f"({e.filename}). Choose a path on a writable disk with free "
                                  "space.") from e
        shutil.rmtree(old, ignore_errors=True)
        store = cls.open(p, mode="r+")
        store.writer = writer
        return store

    # -- the writer lock ----------------------------------------------------
    def lock(self) -> None:
        """Take the store's writer lock; StoreLockedError if another process holds it."""
        if self.writer is None or not self.writer.held:
            self.writer = WriterLock.acquire(self.path / ARRAY_NAME / LOCK_FILE, self.path)

    def unlock(self) -> None:
        """Drop the writer lock, if this store holds it."""
        if self.writer is not None:
            self.writer.release()

    def upgrade(self) -> None:
        """Bring a format 1 store to this layout; a writer holding the lock calls it.

        Each step can be repeated, so a run killed half-way is upgraded by the next.
        """
        legacy, new = self.path / DONE_DIR, self.path / ARRAY_NAME / DONE_DIR
        if legacy.is_dir() and not new.exists():
            os.replace(legacy, new)   # one atomic step
        elif legacy.is_dir():         # a move that was cut short
            for name in os.listdir(legacy):
                os.replace(legacy / name, new / name)
            legacy.rmdir()
        if self.meta.get("format", 1) >= FORMAT:
            return
        _write_coordinates(self.group, self.plan)
        self.array.update_attributes({"description": DESCRIPTION})
        self.group.attrs["jacstream"] = {**self.meta, "format": FORMAT}
        _consolidate(self.path)
        fresh = JobStore.open(self.path, mode="r+")  # the group as consolidated
        self.group, self.array = fresh.group, fresh.array

    # -- metadata ---------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        return dict(cast(dict[str, Any], self.group.attrs["jacstream"]))

    @property
    def plan(self) -> Plan:
        return Plan.from_dict(self.meta["plan"])

    def check_same_job(self, job: dict[str, Any]) -> None:
        diffs = describe_differences(self.meta, job)
        if diffs:
            raise StoreMismatchError(
                f"the store {str(self.path)!r} was made for another job:\n  - "
                + "\n  - ".join(diffs)
                + "\nPass overwrite=True to replace it, or choose another path. The store was "
                "left unchanged.")

    # -- completion records -----------------------------------------------
    def done_blocks(self) -> set[int]:
        if not self._done_dir.exists():
            return set()
        out = set()
        for name in os.listdir(self._done_dir):
            if name.endswith(DONE_SUFFIX):
                try:
                    out.add(int(name[:-len(DONE_SUFFIX)]))
                except ValueError:
                    pass
        return out

    def marker(self, index: int) -> Path:
        """The file whose presence records block ``index`` as done."""
        return self._done_dir / f"{index:08d}{DONE_SUFFIX}"

    def is_done(self, index: int) -> bool:
        return self.marker(index).exists()

    def _mark_done(self, index: int) -> None:
        self._done_dir.mkdir(exist_ok=True)
        final = self.marker(index)
        fd, tmp = tempfile.mkstemp(dir=self._done_dir, suffix=".partial")
        try:
            os.write(fd, json.dumps({"t": time.time()}).encode())
        finally:
            os.close(fd)
        os.replace(tmp, final)
        # the block's chunks are durable already: the marker's flush only has to
        # follow them, and one syncfs covers the file and its directory entry
        sync_files(self._done_dir, [final, self._done_dir])

    # -- writing ----------------------------------------------------------
    def write_block(self, plan: Plan, block: Block, data: np.ndarray, durable: bool = True) -> None:
        """Write one block's data as whole chunks, make it durable, then record it as done.

        A reverse-mode block holds rows ``positions`` x input steps ``[0, in_len)``
        (padded with zeros to whole chunks); a forward-mode block holds the
        columns ``block.in_steps`` for rows ``positions``, whole chunks by plan.
        """
        e0, e1 = block.examples
        p0, p1 = block.positions
        if block.in_steps is not None:
            c0, c1 = block.in_steps
        else:
            c0, c1 = 0, plan.written_in_len(block)
            if data.shape[3] < c1:
                pad = np.zeros(data.shape[:3] + (c1 - data.shape[3],) + data.shape[4:],
                               data.dtype)
                data = np.concatenate([data, pad], axis=3)
            # Leading chunks that are all zero (a causal block's oldest inputs, where the
            # gradients underflowed) are not handed to zarr, which would only compare them
            # with the fill value and store nothing: a chunk belongs to one block, so an
            # unwritten chunk reads as the same zeros.
            skip = _leading_zero_chunks(data, plan.in_chunk)
            c0, data = skip, data[:, :, :, skip:]
        root, origin = self.path / ARRAY_NAME, (e0, p0, 0, c0, 0)
        chunks = tuple(self.array.chunks)
        try:
            if c1 > c0:
                stored = _cast(data, plan.dtype)
                codec = direct_codec(self.array)   # None: codecs only zarr writes
                if codec is None:
                    self.array[e0:e1, p0:p1, :, c0:c1, :] = stored
                else:
                    write_chunks(root, codec, stored, origin, chunks)
            if durable:
                region = (e1 - e0, p1 - p0, data.shape[2], c1 - c0, data.shape[4])
                sync_files(root, chunk_files(root, origin, region, chunks))
            self._mark_done(block.index)
        except OSError as e:
            hint = ("the disk is full: free some space (or move the store), then call "
                    "jacstream.jacobian() again with the same arguments to resume"
                    if e.errno == errno.ENOSPC else
                    "fix the cause, then call jacstream.jacobian() again with the same "
                    "arguments to resume")
            raise StoreWriteError(
                f"writing block {block.index} (output positions {p0}..{p1 - 1}, examples "
                f"{e0}..{e1 - 1}) to {str(self.path)!r} failed: {e.strerror or e}. Finished "
                f"blocks are intact; {hint}.") from e

    def record_run(self, run: dict[str, Any]) -> None:
        meta = self.meta
        meta["runs"] = list(meta.get("runs", [])) + [run]
        self.group.attrs["jacstream"] = meta

    def nbytes_stored(self) -> int:
        """Bytes of the array's chunks and metadata on disk (not jacstream's records)."""
        total = 0
        for root, dirs, files in os.walk(self.path / ARRAY_NAME):
            dirs[:] = [d for d in dirs if d != DONE_DIR]
            for f in files:
                if f != LOCK_FILE:
                    total += os.path.getsize(os.path.join(root, f))
        return total


def _build(path: Path, plan: Plan, meta: dict[str, Any]) -> None:
    """A new store at ``path``: the array, its coordinates, metadata, consolidated."""
    group = zarr.open_group(store=str(path), mode="w")
    group.create_array(
        ARRAY_NAME, shape=plan.shape, chunks=plan.chunks, dtype=native_dtype(plan.dtype),
        attributes={"description": DESCRIPTION}, fill_value=0.0, dimension_names=list(LAYOUT),
        compressors=zarr.codecs.ZstdCodec(level=COMPRESSION_LEVEL),
        config={"write_empty_chunks": False})
    _write_coordinates(group, plan)
    group.attrs["jacstream"] = meta
    (path / ARRAY_NAME / DONE_DIR).mkdir()
    _consolidate(path)


def _made_meanwhile(path: Path) -> StoreError:
    """The error for a store that another process created while this one planned."""
    try:
        WriterLock.acquire(path / ARRAY_NAME / LOCK_FILE, path).release()
    except StoreLockedError as e:
        return e
    return StoreMismatchError(f"{str(path)!r} was created by another process while this call "
                              "was planning. Call again with the same arguments to resume it, "
                              "or pass overwrite=True to replace it.")


def _leading_zero_chunks(data: np.ndarray, chunk: int) -> int:
    """Input steps, in whole chunks from step 0, over which ``data`` is exactly zero."""
    n = 0
    while n < data.shape[3] and not data[:, :, :, n:n + chunk].any():
        n += chunk
    return min(n, data.shape[3])
