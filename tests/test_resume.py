"""Crash safety: killed runs resume, lose nothing and never redo finished blocks."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_jacobian_close, build_model, reference_jacobian

import jacstream
from jacstream.errors import IncompleteStoreWarning, StoreMismatchError, StoreWriteError
from jacstream.store.jobstore import done_dir

JOB = str(Path(__file__).with_name("_resume_job.py"))
N_BLOCKS = 30  # 240 steps / block_size 8


def _done(store: Path) -> set[int]:
    d = done_dir(store)
    return {int(n[:-5]) for n in os.listdir(d) if n.endswith(".done")} if d.exists() else set()


def _default_sigint() -> None:
    # A child inherits an ignored SIGINT (something earlier in this pytest worker can
    # leave it ignored), and Python then never raises KeyboardInterrupt: Ctrl-C is
    # tested on a process that handles it as a terminal's would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(store: Path, strategy: str = "sensitivity") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, JOB, str(store), "8", strategy],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _kill_when(proc: subprocess.Popen, store: Path, n_done: int, extra_delay: float) -> set[int]:
    deadline = time.time() + 300
    while len(_done(store)) < n_done:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "job too slow"
        time.sleep(0.01)
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return _done(store)


def _chunk_files(store: Path) -> dict[str, bytes]:
    root = store / "jacobian"
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "jacstream_blocks"]   # the markers hold a time
        for f in files:
            if f == "jacstream.lock":
                continue
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def _finish(store: Path, strategy: str = "sensitivity") -> dict:
    out = subprocess.run([sys.executable, JOB, str(store), "8", strategy], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("strategy", ["sensitivity", "tile"])
def test_sigkill_at_several_moments_then_resume_is_bitwise_identical(tmp_path, strategy):
    # the sweep restarts from step 0 after a kill; tile recomputes only the missing blocks
    clean = tmp_path / "clean.zarr"
    first = _finish(clean, strategy)
    assert sorted(first["computed"]) == list(range(N_BLOCKS))

    store = tmp_path / "killed.zarr"
    # early: the store exists but no block is finished yet
    proc = _start(store, strategy)
    while not (store / "zarr.json").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = [_done(store)]
    # mid-run, in the middle of a block; then near the end
    for n_done, delay in ((N_BLOCKS // 2, 0.03), (N_BLOCKS - 2, 0.0)):
        proc = _start(store, strategy)
        done_before.append(_kill_when(proc, store, n_done, delay))
    assert 0 < len(done_before[1]) < N_BLOCKS and len(done_before[2]) < N_BLOCKS

    with pytest.warns(IncompleteStoreWarning, match="incomplete"):
        partial = jacstream.open(store)
    assert not partial.complete and partial.blocks_done == len(done_before[-1])

    last = _finish(store, strategy)
    # no finished block was computed twice: the resume computed exactly the missing ones
    assert set(last["computed"]).isdisjoint(done_before[-1])
    assert set(last["computed"]) | done_before[-1] == set(range(N_BLOCKS))
    assert last["skipped"] == len(done_before[-1])

    J, ref = jacstream.open(store), jacstream.open(clean)
    assert J.complete and J.blocks_done == J.n_blocks == N_BLOCKS
    # Bitwise: both stores ran the same job script (one fixed strategy and blocking) on this
    # machine, so every block is the same traced function on the same inputs.
    assert J[...].tobytes() == ref[...].tobytes()
    assert _chunk_files(store) == _chunk_files(clean)


def test_ctrl_c_stops_cleanly_with_a_resume_hint(tmp_path):
    store = tmp_path / "j.zarr"
    proc = _start(store)
    while len(_done(store)) < 3:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted" in err and "again with the same arguments to resume" in err
    done = _done(store)
    assert 3 <= len(done) < N_BLOCKS
    last = _finish(store)
    assert set(last["computed"]).isdisjoint(done)
    assert jacstream.open(store).complete


@pytest.fixture
def small_job():
    model, f_in, _, _ = build_model("lstm_dense")
    x = np.random.default_rng(8).normal(size=(3, 30, f_in)).astype("float32")
    return model, x, reference_jacobian(model, x)


def test_disk_full_is_reported_and_resumable(small_job, tmp_path, monkeypatch):
    # the function that writes each chunk file (jacstream.store.chunks); the real full
    # filesystem is the next test's (it needs root)
    import jacstream.store.chunks as local

    model, x, ref = small_job
    real_put = local._put
    calls = {"n": 0}

    def put_until_full(path, data):
        if "jacobian/c/" in str(path).replace(os.sep, "/"):
            calls["n"] += 1
            if calls["n"] > 4:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, data)

    monkeypatch.setattr(local, "_put", put_until_full)
    store = tmp_path / "j.zarr"
    with pytest.raises(StoreWriteError, match="disk is full") as info:
        jacstream.jacobian(model, x, store, block_size=3, in_chunk=30, progress=False)
    assert "Finished blocks are intact" in str(info.value)
    assert isinstance(info.value, OSError)
    done = _done(store)
    assert len(done) == 4  # four chunk writes succeeded: four whole blocks
    monkeypatch.setattr(local, "_put", real_put)
    J = jacstream.jacobian(model, x, store, block_size=3, in_chunk=30, progress=False)
    assert set(J.stats["computed_blocks"]).isdisjoint(done)
    assert J.complete
    assert_jacobian_close(J[...], ref, "after disk-full resume")


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux",
                    reason="mounting a small tmpfs needs root on Linux")
def test_real_full_filesystem_then_resume(small_job, tmp_path):
    model, x, ref = small_job
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.strip()}")
    try:
        store = mnt / "j.zarr"
        with pytest.raises(StoreWriteError, match="disk is full"):
            jacstream.jacobian(model, x, store, block_size=1, in_chunk=30, progress=False)
        done = _done(store)
        assert 0 < len(done) < 30
        subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
        J = jacstream.jacobian(model, x, store, block_size=1, in_chunk=30, progress=False)
        assert J.complete and set(J.stats["computed_blocks"]).isdisjoint(done)
        assert_jacobian_close(J[...], ref, "after a real full disk")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_store_for_another_job_is_refused_and_left_intact(small_job, tmp_path):
    model, x, _ = small_job
    store = tmp_path / "j.zarr"
    jacstream.jacobian(model, x, store, block_size=5, progress=False)
    before = _chunk_files(store)
    cases = [
        (dict(inputs=x * 2), "inputs"),
        (dict(out_steps=[1, 2]), "out_steps"),
        (dict(causal=False), "causal"),
        (dict(dtype="float64"), "dtype"),
        (dict(block_size=7), "block_size"),
    ]
    for change, field in cases:
        kwargs = dict(inputs=x, block_size=5, progress=False)
        kwargs.update(change)
        inputs = kwargs.pop("inputs")
        with pytest.raises(StoreMismatchError, match=field) as info:
            jacstream.jacobian(model, inputs, store, **kwargs)
        assert "overwrite=True" in str(info.value)
    other, _, _, _ = build_model("gru")  # other weights and layers, same shapes of data? no:
    with pytest.raises(jacstream.JacstreamError):
        jacstream.jacobian(other, np.repeat(x, 2, axis=2), store, block_size=5, progress=False)
    assert _chunk_files(store) == before


def test_other_weights_are_detected(small_job, tmp_path):
    model, x, _ = small_job
    store = tmp_path / "j.zarr"
    jacstream.jacobian(model, x, store, block_size=5, progress=False)
    model2, _, _, _ = build_model("lstm_dense")
    model2.set_weights([w + 0.01 for w in model.get_weights()])
    with pytest.raises(StoreMismatchError, match="model: store has fingerprint"):
        jacstream.jacobian(model2, x, store, block_size=5, progress=False)


def test_overwrite_replaces_a_store(small_job, tmp_path):
    model, x, ref = small_job
    store = tmp_path / "j.zarr"
    jacstream.jacobian(model, x, store, out_steps=[0, 1], progress=False)
    J = jacstream.jacobian(model, x * 1.0, store, out_steps=None, block_size=4, overwrite=True,
                           progress=False)
    assert J.complete and J.shape == ref.shape
    assert_jacobian_close(J[...], ref, "overwritten")


def test_resume_keeps_the_stored_plan(small_job, tmp_path):
    model, x, _ = small_job
    store = tmp_path / "j.zarr"
    J1 = jacstream.jacobian(model, x, store, memory_budget="64MiB", progress=False)
    J2 = jacstream.jacobian(model, x, store, memory_budget="1GiB", progress=False)
    assert J2.plan == J1.plan and J2.stats["computed_blocks"] == []
