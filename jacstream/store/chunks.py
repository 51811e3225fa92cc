"""Writing a block's chunks straight to their files, as zarr itself would write them.

A block covers whole chunks of the Jacobian array (its examples, its output
steps, input steps from a chunk boundary), and only the process that holds the
store's writer lock writes them. For the codecs jacstream creates arrays with
(``bytes`` little-endian, then ``zstd``) a chunk file is the chunk's C-order
bytes compressed by numcodecs' ``Zstd`` at the array's level: exactly what
zarr-python's ``Array.__setitem__`` writes (``tests/test_store_format.py``
compares the files byte for byte), without its per-chunk machinery, which held
the GIL against the computing thread (a T=3000 run of the reference model, both
at zstd level 0: 2.36-2.45 s instead of 2.53-2.71 s, three runs each of one
script alternating checkouts). Like
zarr with ``write_empty_chunks=False``, a chunk that is all fill value is not
stored (and a stale file of it is removed), edge chunks are padded with the
fill value to the full chunk shape, and each file is written to a temporary
name and renamed into place. Arrays with other codecs or chunk keys are left
to zarr (:func:`direct_codec` returns None). No TensorFlow here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["chunk_files", "direct_codec", "write_chunks"]


def direct_codec(array: Any) -> Any:
    """The numcodecs ``Zstd`` that encodes ``array``'s chunks, or None if zarr must write them.

    Only for a zarr v3 array with the regular chunk grid, the default ``/`` chunk
    keys, fill value 0, and the codecs ``bytes`` (little-endian) then ``zstd``
    without checksum.
    """
    import numcodecs
    from zarr.codecs import BytesCodec, ZstdCodec

    meta = array.metadata
    try:
        codecs = list(meta.codecs)
        sep = meta.chunk_key_encoding.separator
        name = meta.chunk_key_encoding.name
    except AttributeError:   # zarr v2 metadata, or another zarr
        return None
    if len(codecs) != 2 or name != "default" or sep != "/" or float(meta.fill_value) != 0.0:
        return None
    raw, zstd = codecs
    if not (isinstance(raw, BytesCodec) and str(getattr(raw.endian, "value", raw.endian))
            == "little" and isinstance(zstd, ZstdCodec) and not zstd.checksum):
        return None
    return numcodecs.Zstd(level=zstd.level)


def _put(path: Path, data: bytes) -> None:
    """Write one chunk file: to a temporary name, then renamed into place."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_bytes(data)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
    os.replace(tmp, path)


def write_chunks(root: Path, codec: Any, data: np.ndarray, origin: tuple[int, ...],
                 chunks: tuple[int, ...]) -> list[Path]:
    """Write ``data``, the region of the array starting at ``origin``, as whole chunks.

    ``root``: the array's directory; ``chunks``: its chunk shape. The region
    starts on chunk boundaries and ends on one or at the array's end. Returns
    the chunk files written (a chunk of fill values is not).

    Examples
    --------
    >>> import tempfile, numcodecs
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> data = np.ones((2, 3), np.float32)
    >>> [p.relative_to(root).as_posix() for p in
    ...  write_chunks(root, numcodecs.Zstd(), data, (0, 0), (2, 2))]
    ['c/0/0', 'c/0/1']
    """
    written = []
    for index, region in _chunks_of(data.shape, origin, chunks):
        piece = data[region]
        path = _chunk_path(root, index)
        if not piece.any():
            path.unlink(missing_ok=True)   # a chunk of fill values is not stored
            continue
        if piece.shape != tuple(chunks):   # an edge chunk is stored at the full chunk shape
            pad = np.zeros(chunks, piece.dtype)
            pad[tuple(slice(0, n) for n in piece.shape)] = piece
            piece = pad
        _put(path, codec.encode(np.ascontiguousarray(piece).view(np.uint8)))
        written.append(path)
    return written


def chunk_files(root: Path, origin: tuple[int, ...], shape: tuple[int, ...],
                chunks: tuple[int, ...]) -> list[Path]:
    """The files of every chunk of the region ``shape`` at ``origin`` (written or not)."""
    return [_chunk_path(root, index) for index, _ in _chunks_of(shape, origin, chunks)]


def _chunk_path(root: Path, index: tuple[int, ...]) -> Path:
    """A chunk's file under the array's directory ``root`` (zarr v3 default keys)."""
    return root.joinpath("c", *(str(i) for i in index))


def _chunks_of(shape: tuple[int, ...], origin: tuple[int, ...], chunks: tuple[int, ...],
               ) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """Each chunk of a region: its grid index and its slice of the region's data."""
    grids = [range(o // c, -(-(o + n) // c)) for o, n, c in zip(origin, shape, chunks,
                                                               strict=True)]
    for index in np.ndindex(*(len(g) for g in grids)):
        idx = tuple(g[i] for g, i in zip(grids, index, strict=True))
        yield idx, tuple(slice(i * c - o, i * c - o + c) for i, c, o in
                         zip(idx, chunks, origin, strict=True))
