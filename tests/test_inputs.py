"""Inputs beyond NumPy arrays: tf.data.Dataset, zarr arrays, .npy and zarr paths, large batches.

Every Jacobian is compared with ``tf.GradientTape.batch_jacobian`` on the whole batch.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from conftest import assert_jacobian_close

import jacstream
from jacstream.errors import InputError
from jacstream.run import inputs as _inputs
from jacstream.run.inputs import LazyInputs, as_inputs


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


@pytest.fixture(scope="module")
def reference_model(tf):
    """The reference architecture of the question (LSTM -> TimeDistributed(Dense)), small."""
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input(shape=(None, 1))
    h = keras.layers.LSTM(6, return_sequences=True)(inp)
    out = keras.layers.TimeDistributed(keras.layers.Dense(1))(h)
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def model(tf):
    """A quicker model to trace (Dense head) for the other end-to-end checks."""
    import keras

    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((None, 1)), keras.layers.LSTM(4, return_sequences=True),
                             keras.layers.Dense(1)])


def batch_jacobian(model, x):
    import tensorflow as tf

    x = tf.constant(np.asarray(x, dtype=np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x)
    return tape.batch_jacobian(y, x).numpy()


def leftovers(directory):
    gc.collect()
    return sorted(p.name for p in directory.iterdir() if ".inputs-" in p.name)


# --------------------------------------------------------------------------- datasets
def test_dataset_of_the_original_question_matches_batch_jacobian(tf, reference_model, tmp_path):
    model = reference_model
    # Exactly how the inputs were built in the question this project answers.
    inputs = tf.data.Dataset.from_tensor_slices(np.random.rand(10, 100, 1))  # noqa: NPY002
    outputs = tf.data.Dataset.from_tensor_slices(np.random.rand(10, 100, 1))  # noqa: NPY002
    dataset = tf.data.Dataset.zip((inputs, outputs)).batch(10)

    J = jacstream.jacobian(model, dataset, tmp_path / "jac.zarr", block_size=25, progress=False)

    x = np.concatenate([xb for xb, _ in dataset.as_numpy_iterator()])
    assert J.shape == (10, 100, 1, 100, 1)
    assert_jacobian_close(J[...], batch_jacobian(model, x))
    assert leftovers(tmp_path) == []  # the spooled inputs are gone


def test_dataset_batches_go_into_one_store_in_order(tf, model, tmp_path):
    x = np.random.default_rng(0).normal(size=(7, 16, 1)).astype("float32")
    y = np.zeros_like(x)
    ds = tf.data.Dataset.zip((tf.data.Dataset.from_tensor_slices(x),
                              tf.data.Dataset.from_tensor_slices(y))).batch(3)  # 3 + 3 + 1

    J = jacstream.jacobian(model, ds, tmp_path / "jac.zarr", block_size=8, progress=False)
    assert_jacobian_close(J[...], batch_jacobian(model, x))

    # Same examples in the same order: the NumPy array is the same job, nothing is recomputed.
    again = jacstream.jacobian(model, x, tmp_path / "jac.zarr", block_size=8, progress=False)
    assert again.stats["blocks_computed"] == 0
    assert again.stats["blocks_skipped"] == J.n_blocks


@pytest.mark.parametrize("build", [
    pytest.param(lambda tf, x: tf.data.Dataset.from_tensor_slices(x).batch(2), id="x-batches"),
    pytest.param(lambda tf, x: tf.data.Dataset.from_tensor_slices(x), id="unbatched"),
    pytest.param(lambda tf, x: tf.data.Dataset.from_tensor_slices((x, x, x[:, :, 0])).batch(4),
                 id="x-y-weights"),
    pytest.param(lambda tf, x: iter([x[:3], x[3:]]), id="python-iterator"),
])
def test_dataset_shapes(tf, tmp_path, build):
    # The engine reads whatever as_inputs returns (end to end: the tests above).
    x = np.random.default_rng(1).normal(size=(5, 12, 1)).astype("float32")
    got = as_inputs(build(tf, x), scratch=tmp_path / "j.zarr")
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got[1:4], x[1:4])   # copied values, no arithmetic


@pytest.mark.parametrize(("batches", "match"), [
    ([], "no batches"),
    ([np.ones((2, 5, 1)), np.ones((2, 6, 1))], "same length"),
    ([np.ones((2, 5, 1), dtype=int)], "floating point"),
    ([{"x": np.ones((2, 5, 1))}], "dict"),
    ([np.ones((2, 2, 5, 1))], r"shape \(2, 2, 5, 1\)"),
    ([np.ones(5)], r"shape \(1, 5\)|shape \(5,\)"),
])
def test_bad_dataset_batches(tmp_path, batches, match):
    with pytest.raises(InputError, match=match):
        as_inputs(iter(batches), scratch=tmp_path / "jac.zarr")
    assert leftovers(tmp_path) == []


def test_spool_writes_whole_chunks_and_keeps_order(tmp_path, monkeypatch):
    monkeypatch.setattr(_inputs, "SPOOL_CHUNK_BYTES", 4 * 5 * 4)  # 4 examples of (5, 1)
    rng = np.random.default_rng(2)
    batches = [rng.normal(size=(n, 5, 1)) for n in (3, 3, 1, 6, 2)]
    held = []
    real_add = _inputs._Spool.add

    def add(self, x):
        real_add(self, x)
        held.append(self.n_pending)

    monkeypatch.setattr(_inputs._Spool, "add", add)
    x = as_inputs(iter(batches), scratch=tmp_path / "jac.zarr")
    assert isinstance(x, LazyInputs)
    assert max(held) < 4  # never more than one chunk waits in memory
    # bitwise: the same float64 -> float32 rounding of the same values, no arithmetic
    np.testing.assert_array_equal(x[:], np.concatenate(batches).astype("float32"))
    assert x[2:9].dtype == np.float32
    spooled = [p for p in tmp_path.iterdir() if ".inputs-" in p.name]
    assert len(spooled) == 1  # beside the store, not in /tmp
    del x
    assert leftovers(tmp_path) == []


_KILLED_WHILE_SPOOLING = """
import sys, time
import numpy as np
from jacstream.run.inputs import as_inputs

def batches():
    yield np.zeros((2, 5, 1), np.float32)
    print("spooling", flush=True)
    time.sleep(120)

as_inputs(batches(), scratch=sys.argv[1])
"""


def test_spool_of_a_killed_process_is_removed_by_the_next_call(tmp_path):
    store = tmp_path / "jac.zarr"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WHILE_SPOOLING, str(store)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "spooling"
    finally:
        proc.kill()
        proc.wait()
    left = leftovers(tmp_path)
    assert len(left) == 1 and f"-{proc.pid}-" in left[0]  # SIGKILL leaves it behind
    alive = tmp_path / f".jac.zarr.inputs-{os.getppid()}-other"  # a running process's spool
    alive.mkdir()

    x = as_inputs(iter([np.ones((3, 5, 1))]), scratch=store)
    now = leftovers(tmp_path)
    assert left[0] not in now and alive.name in now and len(now) == 2
    del x
    assert leftovers(tmp_path) == [alive.name]


# --------------------------------------------------------------------------- zarr and paths
def test_zarr_inputs_with_more_examples_than_one_slab(model, tmp_path):
    x = np.random.default_rng(3).normal(size=(7, 20, 1))
    z = zarr.create_array(store=str(tmp_path / "x.zarr"), shape=x.shape, chunks=(2, 20, 1),
                          dtype="float64")
    z[:] = x
    J = jacstream.jacobian(model, z, tmp_path / "jac.zarr", block_size=10, examples_per_block=3,
                           progress=False)
    assert J.plan.n_example_blocks == 3 and J.n_blocks == 6
    assert J.complete
    assert_jacobian_close(J[...], batch_jacobian(model, x))


def test_paths_of_zarr_arrays_groups_and_npy(model, tmp_path):
    x = np.random.default_rng(4).normal(size=(3, 10, 1)).astype("float32")
    ref = batch_jacobian(model, x)
    g = zarr.open_group(str(tmp_path / "data.zarr"), mode="w")
    g.create_array("x", shape=x.shape, dtype="float32")[:] = x
    np.save(tmp_path / "x.npy", x.astype("float64"))
    for path in [tmp_path / "data.zarr" / "x", tmp_path / "data.zarr", str(tmp_path / "x.npy")]:
        np.testing.assert_array_equal(as_inputs(path)[:], x)   # float32 values stored exactly
    J = jacstream.jacobian(model, str(tmp_path / "x.npy"), tmp_path / "j.zarr", progress=False)
    assert_jacobian_close(J[...], ref)


@pytest.mark.parametrize(("make", "match"), [
    (lambda p: np.zeros((2, 5)), "Add a feature axis"),
    (lambda p: np.zeros((0, 5, 1)), "empty axis"),
    (lambda p: np.zeros((2, 5, 1), dtype=int), "floating point"),
    (lambda p: object(), "got object"),
    (lambda p: [[1.0], [2.0, 3.0]], "got list"),
    (lambda p: p / "missing.npy", "no such file"),
    (lambda p: (p / "x.txt").write_text("1 2 3") and p / "x.txt", "neither a .npy"),
    (lambda p: (p / "bad.npy").write_text("nope") and p / "bad.npy", "cannot read"),
    (lambda p: p, "not a zarr array"),
])
def test_bad_inputs(tmp_path, make, match):
    with pytest.raises(InputError, match=match):
        as_inputs(make(tmp_path))


def test_zarr_group_with_several_arrays_lists_them(tmp_path):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    for name in ("a", "b"):
        g.create_array(name, shape=(2, 3, 1), dtype="float32")
    with pytest.raises(InputError, match=r"2 arrays.*g\.zarr/a"):
        as_inputs(tmp_path / "g.zarr")


@pytest.mark.parametrize(("kind", "lazy"), [
    ("numpy64", False), ("numpy32", False), ("npy64", True), ("zarr32", True)])
def test_arrays_stay_lazy_and_come_back_float32(tmp_path, kind, lazy):
    if kind.startswith("numpy"):
        array = np.ones((2, 3, 1), dtype="float" + kind[-2:])
    elif kind == "npy64":
        np.save(tmp_path / "a.npy", np.ones((2, 3, 1)))
        array = np.load(tmp_path / "a.npy", mmap_mode="r")
    else:
        array = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=(2, 3, 1),
                                  dtype="float32")
    x = as_inputs(array)
    assert (not isinstance(x, np.ndarray) or isinstance(x, np.memmap)) == lazy
    assert np.asarray(x[0:1]).dtype == np.float32
