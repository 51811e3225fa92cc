"""The store on disk (issue 19): self-describing, quiet to read, one writer at a time.

* xarray and zarr alone (a process without jacstream) read a store as the labeled
  view ``J.to_xarray()`` gives, without a single warning;
* stores written by the previous version (format 1) open, read and resume, and the
  run that resumes one upgrades it;
* a second process that would write a store being written is refused at once, naming
  the writer; a writer killed with SIGKILL leaves no lock behind.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import jacstream
from jacstream.cli import main as cli_main
from jacstream.errors import IncompleteStoreWarning, StoreLockedError
from jacstream.store import JobStore
from jacstream.store.jobstore import done_dir

HERE = Path(__file__).parent
FORMAT1 = HERE / "data" / "store_format1"   # written by jacstream 0.1.0 before issue 19
WRITER = str(HERE / "_writer_job.py")

# Run in a process that never imports jacstream: every warning is an error, and every
# node is listed (zarr warns about any entry it does not recognise while listing).
QUIET_READ = textwrap.dedent("""
    import pickle, sys, warnings
    import xarray as xr
    import zarr
    path, out = sys.argv[1], sys.argv[2]
    warnings.simplefilter("error")
    zarr.open(path, mode="r")
    for consolidated in (None, False):
        group = zarr.open_group(path, mode="r", use_consolidated=consolidated)
        names = sorted(name for name, _ in group.members(max_depth=None))
    views = [xr.open_zarr(path), xr.open_dataset(path, engine="zarr")]
    assert "jacstream" not in sys.modules
    with open(out, "wb") as f:
        pickle.dump({"names": names, "views": [v.load() for v in views]}, f)
""")


def quiet_read(path: Path, tmp_path: Path) -> dict:
    """Open ``path`` with zarr and xarray alone, warnings as errors; what they read."""
    out = tmp_path / f"read-{time.monotonic_ns()}.pkl"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", QUIET_READ, str(path), str(out)], env=env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out, "rb") as f:
        return pickle.load(f)


def x_squared(x):
    return x ** 2


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --------------------------------------------------------------------------- self-describing
def test_xarray_alone_reads_the_labeled_view_without_a_warning(tmp_path):
    import xarray as xr

    x = np.random.default_rng(0).normal(size=(3, 12, 2)).astype("float32")
    path = tmp_path / "j.zarr"
    J = jacstream.jacobian(x_squared, x, path, out_steps=[2, 5, 6, 11], block_size=2,
                           strategy="tile", causal=False, progress=False)
    read = quiet_read(path, tmp_path)
    assert read["names"] == sorted(["jacobian", *J.dims])
    want = J.to_xarray().load()
    assert list(want.out_step.values) == [2, 5, 6, 11]   # the real output steps
    for ds in read["views"]:
        xr.testing.assert_identical(ds["jacobian"], want)
        assert set(ds.data_vars) == {"jacobian"}
        assert ds.attrs["jacstream"]["out_steps"] == [2, 5, 6, 11]


def test_reduced_store_reads_without_a_warning(tmp_path):
    import xarray as xr

    from jacstream.store.reduced import load_reduced, save_reduced

    result = xr.DataArray(np.arange(6.0).reshape(2, 3), dims=("out_step", "lag"),
                          coords={"out_step": [4, 9], "lag": [0, 1, 2]}, name="lag_profile")
    path = tmp_path / "lag.zarr"
    save_reduced(result, path)
    xr.testing.assert_identical(load_reduced(path), result)
    (ds,) = quiet_read(path, tmp_path)["views"][:1]
    xr.testing.assert_equal(ds["lag_profile"], result)


# --------------------------------------------------------------------------- format 1 stores
def test_store_of_the_previous_version_opens_and_reads_unchanged(tmp_path, capsys):
    path = tmp_path / "old.zarr"
    shutil.copytree(FORMAT1, path)
    before = _files(path)
    J = jacstream.open(path)
    assert J.complete and J.attrs["format"] == 1 and J.shape == (2, 3, 1, 6, 1)
    x = np.arange(1, 13, dtype="float32").reshape(2, 6, 1)   # the inputs it was written for
    want = np.zeros(J.shape, "float32")
    for a, t in enumerate([1, 3, 5]):
        want[:, a, 0, t, 0] = 2 * x[:, t, 0]
    np.testing.assert_array_equal(J[...], want)   # d x^2 / dx = 2x, exact in float32
    assert list(J.to_xarray().out_step.values) == [1, 3, 5]
    # the analyses read it: the mean |J| over the examples, where x = 4 and 10
    assert float(jacstream.analysis.influence_map(J).sel(out_step=3, in_step=3)) == 14.0
    assert cli_main(["info", str(path)]) == 0
    assert "3 / 3 done" in capsys.readouterr().out
    assert _files(path) == before   # reading never writes


def _as_format1(path: Path) -> None:
    """Turn a store into what the previous version wrote (the layout of FORMAT1)."""
    top = path / "zarr.json"
    meta = json.loads(top.read_text())
    meta.pop("consolidated_metadata", None)
    meta["attributes"]["jacstream"]["format"] = 1
    top.write_text(json.dumps(meta))
    array = path / "jacobian" / "zarr.json"
    meta = json.loads(array.read_text())
    meta["attributes"] = {}
    array.write_text(json.dumps(meta))
    for name in ("example", "out_step", "out_feature", "in_step", "in_feature"):
        shutil.rmtree(path / name)
    os.replace(path / "jacobian" / "jacstream_blocks", path / "jacstream_blocks")
    os.remove(path / "jacobian" / "jacstream.lock")
    assert sorted(os.listdir(path)) == sorted(os.listdir(FORMAT1))
    assert sorted(os.listdir(path / "jacobian")) == sorted(os.listdir(FORMAT1 / "jacobian"))


def test_store_of_the_previous_version_resumes_and_is_upgraded(tmp_path):
    import xarray as xr

    x = np.random.default_rng(1).normal(size=(2, 8, 1)).astype("float32")
    kw = dict(block_size=2, strategy="tile", causal=False, progress=False)
    path = tmp_path / "j.zarr"
    full = jacstream.jacobian(x_squared, x, path, **kw)[...]
    _as_format1(path)
    for i in (1, 3):   # as if the old version had been killed before these blocks
        os.remove(path / "jacstream_blocks" / f"{i:08d}.done")
    with pytest.warns(IncompleteStoreWarning):
        assert jacstream.open(path).blocks_done == 2
    J = jacstream.jacobian(x_squared, x, path, **kw)
    assert sorted(J.stats["computed_blocks"]) == [1, 3] and J.complete
    np.testing.assert_array_equal(J[...], full)   # the same traced blocks, same process
    assert J.attrs["format"] == 2 and not (path / "jacstream_blocks").exists()
    assert done_dir(path) == path / "jacobian" / "jacstream_blocks"
    (ds, _) = quiet_read(path, tmp_path)["views"]
    xr.testing.assert_identical(ds["jacobian"], J.to_xarray().load())


# --------------------------------------------------------------------------- one writer
def _start_writer(store: Path, hold: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, WRITER, str(store)] + ([str(hold)] if hold else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_blocks(proc: subprocess.Popen, store: Path, n: int) -> None:
    deadline = time.monotonic() + 300
    while not (done_dir(store).is_dir() and len(list(done_dir(store).glob("*.done"))) >= n):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the writer is too slow"
        time.sleep(0.02)


def test_one_writer_at_a_time_and_a_killed_writer_leaves_no_lock(tmp_path, capsys):
    store, hold = tmp_path / "j.zarr", tmp_path / "hold"
    hold.touch()
    first = _start_writer(store, hold)   # stores one block, then waits holding the lock
    try:
        _wait_for_blocks(first, store, 1)
        before = _files(store / "jacobian")
        x = np.arange(1, 4 * 8 * 2 + 1, dtype="float32").reshape(4, 8, 2) / 10
        for overwrite in (False, True):
            t0 = time.monotonic()
            with pytest.raises(StoreLockedError) as info:
                jacstream.jacobian(x_squared, x, store, block_size=2, examples_per_block=2,
                                   strategy="tile", causal=False, progress=False,
                                   overwrite=overwrite)
            assert time.monotonic() - t0 < 10   # refused before any tracing
            msg = str(info.value)
            assert f"pid {first.pid} on host {socket.gethostname()}, since " in msg
            assert "_writer_job.py" in msg and "wait for that run to finish" in msg
            assert isinstance(info.value, BlockingIOError)
        assert _files(store / "jacobian") == before   # the refused calls changed nothing
        # Reading needs no lock: the store opens, jacstream info runs, and zarr and xarray
        # alone read it (lock file and all) without a warning.
        with pytest.warns(IncompleteStoreWarning):
            assert 1 <= jacstream.open(store).blocks_done < 8
        assert cli_main(["info", str(store)]) == 0
        assert "INCOMPLETE" in capsys.readouterr().out
        quiet_read(store, tmp_path)
        done = JobStore.open(store).done_blocks()
    finally:
        first.send_signal(signal.SIGKILL)   # the lock goes with the process
        first.wait()
    second = _start_writer(store)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    last = json.loads(out.strip().splitlines()[-1])
    assert last["skipped"] >= len(done) and set(last["computed"]).isdisjoint(done)
    J = jacstream.open(store)
    assert J.complete
    want = np.zeros(J.shape, "float32")
    for t in range(8):
        for f in range(2):
            want[:, t, f, t, f] = 2 * x[:, t, f]
    np.testing.assert_allclose(J[...], want, rtol=1e-6)
    read = quiet_read(store, tmp_path)
    assert read["views"][0]["jacobian"].shape == J.shape


def test_blocks_are_flushed_with_one_syncfs_where_linux_has_it(tmp_path):
    # write_block flushes a block's chunk files in one syncfs(2) on Linux (an fsync of each
    # elsewhere); both paths flush real files, and a failed flush is an OSError, which
    # write_block turns into a StoreWriteError.
    import sys

    from jacstream.store import durable

    files = [tmp_path / f"c{i}" for i in range(3)]
    for f in files:
        f.write_bytes(b"chunk")
    assert (durable._syncfs() is not None) == sys.platform.startswith("linux")
    durable.sync_files(tmp_path, files)
    durable.sync_files(tmp_path, files + [tmp_path / "never-written"], use_syncfs=False)
    with pytest.raises(OSError):
        durable.sync_files(tmp_path / "gone", files)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_chunk_files_are_the_ones_zarr_writes(dtype, tmp_path):
    # jacstream writes a block's chunks straight to their files (store/chunks.py); zarr's
    # own Array.__setitem__ must write the very same bytes: interior, edge (padded) and
    # all-zero chunks (not stored), for every storage dtype.
    import zarr
    from zarr.codecs import ZstdCodec

    from jacstream.store.chunks import direct_codec, write_chunks
    from jacstream.store.dtypes import cast, native_dtype, register_bfloat16

    register_bfloat16()
    rng = np.random.default_rng(4)
    shape, chunks = (3, 10, 2, 13, 1), (3, 4, 2, 5, 1)
    data = cast(rng.normal(size=(3, 6, 2, 13, 1)), dtype)   # output steps 4..9, edges on 2 axes
    data[:, :, :, :5] = 0                                     # a chunk of zeros on each row
    arrays = []
    for name in ("zarr", "direct"):
        a = zarr.create_array(str(tmp_path / name), shape=shape, chunks=chunks,
                              dtype=native_dtype(dtype), fill_value=0.0,
                              compressors=ZstdCodec(level=-1),
                              config={"write_empty_chunks": False})
        arrays.append(a)
    arrays[0][:, 4:10] = data
    codec = direct_codec(arrays[1])
    assert codec is not None
    written = write_chunks(tmp_path / "direct", codec, data, (0, 4, 0, 0, 0), chunks)
    files = {name: {p.relative_to(tmp_path / name).as_posix(): p.read_bytes()
                    for p in (tmp_path / name / "c").rglob("*") if p.is_file()}
             for name in ("zarr", "direct")}
    assert sorted(files["direct"]) == sorted(p.relative_to(tmp_path / "direct").as_posix()
                                             for p in written)
    assert "c/0/1/0/0/0" not in files["direct"]          # all zeros: not stored
    assert files["direct"] == files["zarr"]
    back = zarr.open_array(str(tmp_path / "direct"), mode="r")[:]
    assert np.array_equal(back[:, 4:10].astype(np.float64), data.astype(np.float64))
    assert not back[:, :4].any()


def test_arrays_of_other_codecs_are_written_by_zarr(tmp_path):
    import zarr
    from zarr.codecs import BloscCodec

    from jacstream.store.chunks import direct_codec

    a = zarr.create_array(str(tmp_path / "a"), shape=(4,), chunks=(2,), dtype="f4",
                          compressors=BloscCodec())
    assert direct_codec(a) is None
