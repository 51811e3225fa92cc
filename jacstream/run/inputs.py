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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..planning.units import is_float

__all__ = ["LazyInputs", "Side", "as_inputs", "check_side", "is_dataset", "split_inputs"]

# Examples are spooled to disk in chunks of about this many bytes.
SPOOL_CHUNK_BYTES = 8 * 2**20


class LazyInputs:
    """A read-only ``(batch, steps, features)`` view whose slices come back as ``dtype``.

    Wraps a lazily indexed array (zarr, memory map) of another dtype than the
    model computes in (float32, or float64 for a float64 model), or a temporary
    spool that must live as long as the view.
    """

    def __init__(self, array: Any, keep: Any = None, source: str = "",
                 dtype: str = "float32") -> None:
        self._array = array
        self._keep = keep  # e.g. a TemporaryDirectory: deleted with this object
        self.source = source
        self._dtype = np.dtype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._array.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._array[key], dtype=self._dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[...]
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        src = f" from {self.source}" if self.source else ""
        return f"<jacstream inputs shape={self.shape} {self._dtype}{src}>"


def is_dataset(obj: Any) -> bool:
    """True for a ``tf.data.Dataset``, recognised by what it does (no TensorFlow here)."""
    return (not isinstance(obj, type) and hasattr(obj, "as_numpy_iterator")
            and hasattr(obj, "element_spec"))


def as_inputs(inputs: Any, *, scratch: str | os.PathLike[str] | None = None,
              dtype: str = "float32") -> Any:
    """Validate ``inputs``; return an array of shape (batch, steps, features) sliceable lazily.

    Parameters
    ----------
    inputs : array-like, zarr array, str or path, tf.data.Dataset or iterator
        See the module docstring for what each kind means.
    scratch : str or path, optional
        The store the inputs are for: a dataset is spooled into a temporary
        directory beside it (same disk, not RAM-backed ``/tmp``).
    dtype : {"float32", "float64"}
        What the model computes in: slices come back in it.

    Returns
    -------
    numpy.ndarray, zarr.Array or LazyInputs
        Indexing ``[e0:e1]`` gives examples ``e0..e1-1`` as ``dtype``.

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
        return _check(_open_path(Path(inputs)), dtype=dtype)
    if is_dataset(inputs) or isinstance(inputs, Iterator):
        kind = "the dataset" if is_dataset(inputs) else "the iterator"
        return _spool(_dataset_batches(inputs), scratch, kind, dtype)
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
    return _check(inputs, dtype=dtype)


def _check(inputs: Any, what: str = "inputs", dtype: str = "float32") -> Any:
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
        if str(inputs.dtype) != dtype:
            return LazyInputs(inputs, source=getattr(inputs, "filename", None) or "",
                              dtype=dtype)
        return inputs
    if inputs.dtype != np.dtype(dtype):
        inputs = inputs.astype(dtype)
    return inputs


# --------------------------------------------------------------------------- several inputs
@dataclass(frozen=True)
class Side:
    """The inputs of a model of several inputs besides the one differentiated (``wrt``).

    ``arrays[key]`` holds every example on axis 0; ``order`` is the keys of all
    inputs as the model takes them, ``form`` how: ``"dict"``, ``"list"`` or ``"tuple"``.
    """

    wrt: Any
    arrays: dict[Any, np.ndarray]
    order: tuple[Any, ...]
    form: str


SEVERAL_FORM = ("pass them all, as a dict by input name or a list in the model's order, and "
                "name the one to differentiate: jacobian(model, {'seq': x, 'static': s}, "
                "store, wrt='seq') or jacobian(model, [x, s], store, wrt=0)")


def split_inputs(inputs: Any, wrt: Any, model: Any) -> tuple[Any, Side | None]:
    """The input to differentiate, and the others (None for a model of one input).

    ``inputs`` is a dict (by input name) or a list/tuple (in the model's order)
    of arrays when the model takes several; ``wrt`` names the one differentiated:
    the Jacobian is with respect to it, the others go along with their examples.
    """
    model_inputs = getattr(model, "inputs", None)   # a Keras model's (no TensorFlow here)
    n_model = len(model_inputs) if isinstance(model_inputs, (list, tuple)) else 0
    several = isinstance(inputs, dict) or (isinstance(inputs, (list, tuple)) and (
        wrt is not None or n_model > 1))
    if not several:
        if n_model > 1:
            raise InputError(f"the model has {n_model} inputs but inputs is one array; "
                             f"{SEVERAL_FORM}.")
        if wrt is not None:
            raise InputError(f"wrt={wrt!r} picks one of several inputs, but inputs is one "
                             "array: leave wrt out.")
        return inputs, None
    form = "dict" if isinstance(inputs, dict) else type(inputs).__name__
    items = dict(inputs) if isinstance(inputs, dict) else dict(enumerate(inputs))
    listed = ", ".join(f"{k!r} (shape {getattr(v, 'shape', '?')})" for k, v in items.items())
    if not items:
        raise InputError(f"inputs is an empty {form}; {SEVERAL_FORM}.")
    if wrt is None and len(items) == 1:
        wrt = next(iter(items))
    if wrt is None or wrt not in items:
        what = "is missing" if wrt is None else f"is {wrt!r}"
        raise InputError(f"wrt {what}: with several inputs, wrt must name the one to "
                         f"differentiate, one of {listed}.")
    arrays = {k: _side_array(k, v) for k, v in items.items() if k != wrt}
    return items[wrt], Side(wrt, arrays, tuple(items), form)


def _side_array(key: Any, value: Any) -> np.ndarray:
    """A side input as a NumPy array (it is held in memory; blocks take its examples)."""
    if hasattr(value, "numpy") and callable(value.numpy):  # tf.Tensor
        value = value.numpy()
    try:
        a = np.asarray(value)
    except Exception:
        a = np.asarray(None)
    if a.dtype == object or a.ndim == 0:
        raise InputError(f"input {key!r} must be an array with the examples on axis 0, got "
                         f"{type(value).__name__}.")
    return a


def check_side(side: Side, batch: int, dtype: str) -> Side:
    """``side`` with each array checked to hold ``batch`` examples, floats cast to ``dtype``."""
    arrays = {}
    for k, a in side.arrays.items():
        if a.shape[0] != batch:
            raise InputError(f"input {k!r} has {a.shape[0]} examples (shape {a.shape}), input "
                             f"{side.wrt!r} has {batch}: every input needs one entry per "
                             "example, on axis 0.")
        arrays[k] = a.astype(dtype) if is_float(a.dtype) and str(a.dtype) != dtype else a
    return Side(side.wrt, arrays, side.order, side.form)


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
            raise InputError(f"batch {n} of the dataset is a dict with keys {sorted(x)}; a "
                             "dataset must yield one input tensor. For a model of several "
                             "inputs pass arrays: jacobian(model, {'seq': x, 'static': s}, "
                             "store, wrt='seq'); or map the dataset to x or (x, y) batches, "
                             "e.g. ds.map(lambda d: d['x']).")
        if hasattr(x, "numpy") and callable(x.numpy):
            x = x.numpy()
        x = np.asarray(x)
        if x.ndim == 2:  # an unbatched dataset yields single (steps, features) examples
            x = x[None]
        yield x


class _Spool:
    """Append batches to a zarr array in whole chunks, holding at most one chunk in memory."""

    def __init__(self, directory: str, steps: int, features: int,
                 dtype: str = "float32") -> None:
        import zarr

        self.dtype = np.dtype(dtype)
        row = steps * features * self.dtype.itemsize
        self.chunk = max(1, SPOOL_CHUNK_BYTES // row)
        self.array = zarr.create_array(store=os.path.join(directory, "inputs.zarr"),
                                       shape=(0, steps, features), dtype=self.dtype,
                                       chunks=(self.chunk, steps, features))
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def add(self, x: np.ndarray) -> None:
        self.pending.append(np.asarray(x, dtype=self.dtype))
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
           kind: str, dtype: str = "float32") -> LazyInputs:
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
            spool = _Spool(tmp.name, first[0], first[1], dtype=dtype)
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
    return LazyInputs(spool.array, keep=tmp, source=kind, dtype=dtype)
