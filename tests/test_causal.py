"""Causal truncation: exact for causal models, never applied to non-causal ones by "auto"."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import CAUSAL_MODELS, NONCAUSAL_MODELS, assert_jacobian_close, build_model

import jacstream

KERAS_CAUSAL = [m for m in CAUSAL_MODELS if m != "tf_function"]


@pytest.mark.parametrize("causal", [True, False, "auto"], ids=str)
@pytest.mark.parametrize("model_case", CAUSAL_MODELS, indirect=True)
def test_causal_models_exact_with_every_setting(model_case, causal, tmp_path):
    model, x, ref, _ = model_case
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", causal=causal, block_size=5,
                           progress=False)
    assert_jacobian_close(J[...], ref, f"causal={causal}")
    # the reference itself has an exactly zero upper triangle (no path from a later input:
    # exact zeros in any arithmetic)
    T = x.shape[1]
    upper = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(ref[:, :, :, :, :].transpose(0, 2, 4, 1, 3)[..., upper] == 0)


@pytest.mark.parametrize("model_case", KERAS_CAUSAL, indirect=True)
def test_auto_detects_causal_keras_models(model_case, tmp_path):
    model, x, _, _ = model_case
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", block_size=5, progress=False)
    assert J.attrs["causal"] is True and J.plan.causal
    assert "looks back only" in J.attrs["causal_reason"]


def test_auto_does_not_trust_a_plain_callable(tmp_path):
    model, f_in, _, _ = build_model("tf_function")
    x = np.ones((2, 8, f_in), "float32")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", progress=False)
    assert J.attrs["causal"] is False
    assert "cannot inspect" in J.attrs["causal_reason"]


@pytest.mark.parametrize("causal", [False, "auto"], ids=str)
@pytest.mark.parametrize("model_case", NONCAUSAL_MODELS, indirect=True)
def test_noncausal_models_get_the_full_jacobian(model_case, causal, tmp_path):
    model, x, ref, _ = model_case
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", causal=causal, block_size=4,
                           progress=False)
    assert J.attrs["causal"] is False
    assert_jacobian_close(J[...], ref, f"causal={causal}")
    T = x.shape[1]
    # these models really look ahead: something above the diagonal is non-zero
    assert np.any(ref[:, np.arange(T - 1), :, -1, :] != 0)


@pytest.mark.parametrize("name, reason", [("bilstm", "backwards"), ("conv_same", "padding"),
                                          ("last_step", "")])
def test_auto_says_why_it_refused(name, reason, tmp_path):
    model, f_in, _, _ = build_model(name)
    x = np.random.default_rng(0).normal(size=(2, 12, f_in)).astype("float32")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", progress=False)
    assert J.attrs["causal"] is False
    assert reason in J.attrs["causal_reason"]


def test_zero_triangle_chunks_are_never_written(tmp_path):
    model, f_in, _, _ = build_model("lstm_dense")
    T, K = 40, 5
    x = np.random.default_rng(3).normal(size=(2, T, f_in)).astype("float32")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", block_size=K, in_chunk=K,
                           progress=False)
    assert J.causal and J.plan.chunks == (2, K, 1, K, 1)
    chunk_dir = tmp_path / "j.zarr" / "jacobian" / "c" / "0"
    present = {(int(cp), int(ci)) for cp in os.listdir(chunk_dir)
               for ci in os.listdir(chunk_dir / cp / "0")}
    n = T // K
    lower = {(cp, ci) for cp in range(n) for ci in range(n) if ci <= cp}
    assert present == lower  # the n(n-1)/2 chunks above the diagonal do not exist
    full = J[...]
    # exact zeros: chunks above the diagonal read as the fill value, entries in diagonal
    # chunks have no path from a later input
    assert np.all(full[0, :, 0, :, 0][np.triu_indices(T, 1)] == 0)


def test_causal_true_on_mismatched_lengths_is_refused(tmp_path):
    import tensorflow as tf

    def pool(x):
        return tf.nn.avg_pool1d(x, 2, 2, "VALID")

    x = np.ones((2, 8, 1), "float32")
    with pytest.raises(jacstream.JacstreamError, match="causal=True needs as many output steps"):
        jacstream.jacobian(pool, x, tmp_path / "j.zarr", causal=True, progress=False)
    J = jacstream.jacobian(pool, x, tmp_path / "k.zarr", progress=False)
    assert J.shape == (2, 4, 1, 8, 1) and J.attrs["causal"] is False
