"""The model's precision: a float64 model is differentiated in float64.

``dtype=`` is only how the Jacobian is stored. A model built in float64 computes
its Jacobian in float64 in every strategy (the sensitivity sweep's linearisation
too); a float32 model in float32, whatever the storage dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_jacobian_close
from conftest import reference_jacobian as reference

import jacstream

B, T, F = 2, 14, 2


def float64_model(kind="lstm"):
    import keras

    keras.utils.set_random_seed(3)
    rnn = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[kind]
    return keras.Sequential([keras.Input((None, F), dtype="float64"),
                             rnn(6, return_sequences=True, dtype="float64"),
                             keras.layers.Dense(2, dtype="float64")])


@pytest.fixture(scope="module")
def job():
    model = float64_model()
    x = np.random.default_rng(0).normal(size=(B, T, F))   # float64 values
    return model, x, reference(model, x)


@pytest.mark.parametrize("strategy", ["pfor", "tile", "forward", "sensitivity", "auto"])
def test_float64_model_matches_float64_batch_jacobian(job, tmp_path, strategy):
    model, x, ref = job
    assert ref.dtype == np.float64
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy=strategy, dtype="float64",
                           block_size=5, progress=False)
    got = J[...]
    assert got.dtype == np.float64
    assert_jacobian_close(got, ref, strategy, precision="float64")


def test_float64_gru_in_the_sensitivity_sweep(tmp_path):
    model = float64_model("gru")
    x = np.random.default_rng(1).normal(size=(B, T, F))
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="sensitivity",
                           dtype="float64", progress=False)
    assert_jacobian_close(J[...], reference(model, x), "gru", precision="float64")


def test_float64_model_stored_as_float32_is_rounded_once(job, tmp_path):
    model, x, ref = job
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="tile", progress=False)
    got = J[...]
    assert got.dtype == np.float32
    # computed in float64 and rounded once: within one float32 spacing of the float64 values
    # (a float32 computation is off by several for small entries)
    assert np.all(np.abs(got.astype(np.float64) - ref) <= np.spacing(np.abs(ref).astype(np.float32)))


def test_float64_inputs_count_to_the_last_bit_for_resume(job, tmp_path):
    """A float64 model's store identifies its inputs in float64: a change below float32
    rounding is another job."""
    from jacstream.errors import StoreMismatchError

    model, x, _ = job
    path = tmp_path / "j.zarr"
    jacstream.jacobian(model, x, path, strategy="tile", dtype="float64", progress=False)
    nudged = x.copy()
    nudged[0, 0, 0] += 1e-12
    with pytest.raises(StoreMismatchError):
        jacstream.jacobian(model, nudged, path, strategy="tile", dtype="float64",
                           progress=False)
