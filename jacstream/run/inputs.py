"""Inputs: turn what people have into a lazily sliceable ``(batch, steps, features)`` array.

The engine reads inputs one slab of examples at a time (``inputs[e0:e1]``), so
anything sliceable along the batch axis works, and only a slab is ever in
memory. This module accepts:

* NumPy arrays, ``tf.Tensor`` and array-likes (converted to float32);
* zarr arrays, and paths to a zarr array or a ``.npy`` file (read lazily,
  a ``.npy`` through a memory map);
* a ``tf.data.Dataset`` (or any iterator) yielding ``x`` or ``(x, y, ...)``
  batches, as built by ``tf.data.Dataset.zip((inputs, outputs)).batch(10)``.
  Its ``x`` batches are written, in order, to a temporary zarr array next to
  the store, so the number of examples can exceed memory; the temporary
  array is deleted when the returned object is garbage collected. Its name
  holds the process id: a spool left behind by a process that was killed is
  deleted by the next call for the same store.

No TensorFlow here: a ``tf.data.Dataset`` is recognised by its methods.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..planning.units import is_float

__all__ = ["LazyInputs", "as_inputs", "is_dataset"]

# Examples are spooled to disk in chunks of about this many bytes.
SPOOL_CHUNK_BYTES = 8 * 2**20


class LazyInputs:
    """A read-only ``(batch, steps, features)`` view whose slices come back as float32.

    Wraps a lazily indexed array (zarr, memory map) whose dtype is not
    float32, or a temporary spool that must live as long as the view.
    """

    def __init__(self, array: Any, keep: Any = None, source: str = "") -> None:
        self._array = array
        self._keep = keep  # e.g. a TemporaryDirectory: deleted with this object
        self.source = source

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._array.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._array[key], dtype=np.float32)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[...]
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        src = f" from {self.source}" if self.source else ""
        return f"<jacstream inputs shape={self.shape} float32{src}>"


def is_dataset(obj: Any) -> bool:
    """True for a ``tf.data.Dataset``, recognised by what it does (no TensorFlow here)."""
    return (not isinstance(obj, type) and hasattr(obj, "as_numpy_iterator")
            and hasattr(obj, "element_spec"))


def as_inputs(inputs: Any, *, scratch: str | os.PathLike[str] | None = None) -> Any:
    """Validate ``inputs``; return an array of shape (batch, steps, features) sliceable lazily.

    Parameters
    ----------
    inputs : array-like, zarr array, str or path, tf.data.Dataset or iterator
        See the module docstring for what each kind means.
    scratch : str or path, optional
        The store the inputs are for: a dataset is spooled into a temporary
        directory beside it (same disk, not RAM-backed ``/tmp``).

    Returns
    -------
    numpy.ndarray, zarr.Array or LazyInputs
        Indexing ``[e0:e1]`` gives float32 examples ``e0..e1-1``.

    Examples
    --------
    >>> import numpy as np
    >>> as_inputs(np.zeros((2, 5, 1))).dtype
    dtype('float32')
    >>> as_inputs(np.zeros((2, 5)))
    Traceback (most recent call last):
    ...
    jacstream.errors.InputError: inputs must have shape (batch, steps, features), got shape (2, 5) (rank 2). Add a feature axis: inputs[..., None].
    """
    if isinstance(inputs, (str, os.PathLike)):
        return _check(_open_path(Path(inputs)))
    if is_dataset(inputs) or isinstance(inputs, Iterator):
        kind = "the dataset" if is_dataset(inputs) else "the iterator"
        return _spool(_dataset_batches(inputs), scratch, kind)
    if hasattr(inputs, "numpy") and callable(inputs.numpy):  # tf.Tensor
        inputs = inputs.numpy()
    if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
        given = type(inputs).__name__
        try:
            inputs = np.asarray(inputs)
            if inputs.dtype == object:
                raise TypeError
        except Exception:
            raise InputError(f"inputs must be an array of shape (batch, steps, features), a "
                             f"path to a .npy file or zarr array, or a tf.data.Dataset; got "
                             f"{given}.") from None
    return _check(inputs)


def _check(inputs: Any, what: str = "inputs") -> Any:
    shape = tuple(int(s) for s in inputs.shape)
    if len(shape) != 3:
        hint = (" Add a feature axis: inputs[..., None]." if len(shape) == 2 else "")
        raise InputError(f"{what} must have shape (batch, steps, features), got shape {shape} "
                         f"(rank {len(shape)}).{hint}")
    if 0 in shape:
        raise InputError(f"{what} have an empty axis: shape {shape}. Need at least one example, "
                         "one step and one feature.")
    if not is_float(inputs.dtype):
        raise InputError(f"{what} must be floating point to be differentiated, got dtype "
                         f"{inputs.dtype}. Convert them, e.g. inputs.astype('float32').")
    if isinstance(inputs, np.memmap) or not isinstance(inputs, np.ndarray):
        # Lazy (memory map, zarr...): cast slice by slice, never the whole array.
        if str(inputs.dtype) != "float32":
            return LazyInputs(inputs, source=getattr(inputs, "filename", None) or "")
        return inputs
    if inputs.dtype != np.float32:
        inputs = inputs.astype(np.float32)
    return inputs


# --------------------------------------------------------------------------- paths
def _open_path(path: Path) -> Any:
    if not path.exists():
        raise InputError(f"inputs: no such file or directory: {str(path)!r}. Pass a .npy file "
                         "or a zarr array (a directory).")
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"inputs: cannot read {str(path)!r} as a .npy array: {e}") from None
    if path.is_file():
        raise InputError(f"inputs: {str(path)!r} is neither a .npy file nor a zarr array. "
                         "Save the inputs with numpy.save('inputs.npy', x), or pass a zarr "
                         "array's directory.")
    import zarr

    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as e:
        raise InputError(f"inputs: {str(path)!r} is not a zarr array ({type(e).__name__}: "
                         f"{e}).") from None
    if isinstance(node, zarr.Array):
        return node
    names = sorted(node.array_keys())
    if len(names) == 1:
        return node[names[0]]
    listed = ", ".join(repr(f"{path}/{n}") for n in names) or "none"
    raise InputError(f"inputs: {str(path)!r} is a zarr group with {len(names)} arrays; pass the "
                     f"path of one array: {listed}.")


# --------------------------------------------------------------------------- datasets
def _dataset_batches(data: Any) -> Iterator[np.ndarray]:
    items: Iterable[Any] = (data.as_numpy_iterator() if hasattr(data, "as_numpy_iterator")
                            else data)
    for n, item in enumerate(items):
        x = item
        if isinstance(x, (tuple, list)):  # (x, y) or (x, y, sample_weight): keep x
            if not x:
                raise InputError(f"batch {n} of the dataset is an empty tuple; it must yield "
                                 "x or (x, y) batches.")
            x = x[0]
        if isinstance(x, dict):
            raise InputError(f"batch {n} of the dataset is a dict with keys {sorted(x)}; "
                             "jacstream differentiates a model with one input tensor. Map it "
                             "to x or (x, y) batches, e.g. ds.map(lambda d: d['x']).")
        if hasattr(x, "numpy") and callable(x.numpy):
            x = x.numpy()
        x = np.asarray(x)
        if x.ndim == 2:  # an unbatched dataset yields single (steps, features) examples
            x = x[None]
        yield x


class _Spool:
    """Append batches to a zarr array in whole chunks, holding at most one chunk in memory."""

    def __init__(self, directory: str, steps: int, features: int) -> None:
        import zarr

        row = steps * features * 4
        self.chunk = max(1, SPOOL_CHUNK_BYTES // row)
        self.array = zarr.create_array(store=os.path.join(directory, "inputs.zarr"),
                                       shape=(0, steps, features), dtype="float32",
                                       chunks=(self.chunk, steps, features))
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def add(self, x: np.ndarray) -> None:
        self.pending.append(np.asarray(x, dtype=np.float32))
        self.n_pending += len(x)
        if self.n_pending >= self.chunk:
            self.flush(whole_chunks=True)

    def flush(self, whole_chunks: bool = False) -> None:
        if not self.pending:
            return
        buf = np.concatenate(self.pending, axis=0)
        n = len(buf) - len(buf) % self.chunk if whole_chunks else len(buf)
        if n:
            self.array.append(buf[:n], axis=0)
        rest = buf[n:]
        self.pending = [rest] if len(rest) else []
        self.n_pending = len(rest)


def _remove_stale_spools(where: Path, name: str) -> None:
    """Delete spools of ``name`` in ``where`` whose process is gone (it was killed).

    A spool is ``.{name}.inputs-{pid}-XXXX``; one whose process still runs (or
    whose name does not parse) is left alone.
    """
    import shutil

    import psutil

    prefix = f".{name}.inputs-"
    try:
        entries = [p for p in where.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return
    for p in entries:
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _spool(batches: Iterator[np.ndarray], scratch: str | os.PathLike[str] | None,
           kind: str) -> LazyInputs:
    parent = Path(scratch).absolute().parent if scratch is not None else None
    name = Path(scratch).name if scratch is not None else "jacstream"
    where = parent if parent is not None and parent.is_dir() else Path(tempfile.gettempdir())
    _remove_stale_spools(where, name)
    tmp = tempfile.TemporaryDirectory(prefix=f".{name}.inputs-{os.getpid()}-", dir=where)
    spool: _Spool | None = None
    first: tuple[int, ...] = ()
    for n, x in enumerate(batches):
        what = f"batch {n} of {kind}"
        if x.ndim != 3:
            raise InputError(f"{what} has shape {x.shape}; batches must have shape (batch, "
                             "steps, features), or (steps, features) for single examples.")
        if not is_float(x.dtype):
            raise InputError(f"{what} has dtype {x.dtype}; inputs must be floating point to be "
                             "differentiated. Cast them, e.g. ds.map(lambda x, y: "
                             "(tf.cast(x, tf.float32), y)).")
        if spool is None:
            _check(x, what)
            first = x.shape[1:]
            spool = _Spool(tmp.name, *first)
        elif x.shape[1:] != first:
            raise InputError(f"{what} has shape {x.shape}, but batch 0 had (steps, features) = "
                             f"{first}; every example must have the same length and features "
                             "(pad them to one length).")
        if len(x):
            spool.add(x)
    if spool is None:
        tmp.cleanup()
        raise InputError(f"{kind} yielded no batches: there are no inputs to differentiate.")
    spool.flush()
    return LazyInputs(spool.array, keep=tmp, source=kind)
