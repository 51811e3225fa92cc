"""Causal truncation: exact for causal models, never applied to non-causal ones by "auto"."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import (
    CAUSAL_MODELS,
    NONCAUSAL_MODELS,
    assert_jacobian_close,
    build_model,
    reference_jacobian,
)

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


# --------------------------------------------------------------------------- causal=True checked
def _attention(mask: bool):
    """Self-attention over the steps; without the causal mask every step sees every other."""
    import keras

    keras.utils.set_random_seed(8)
    L = keras.layers
    inp = keras.Input((None, 2))
    h = L.Dense(4)(inp)
    a = L.MultiHeadAttention(num_heads=1, key_dim=4)(h, h, use_causal_mask=mask)
    return keras.Model(inp, L.Dense(1)(a))


def test_a_broken_causal_promise_is_refused_with_the_evidence(tmp_path):
    model = _attention(mask=False)
    x = np.random.default_rng(8).normal(size=(2, 20, 2)).astype("float32")
    with pytest.raises(jacstream.errors.ModelError) as info:
        jacstream.jacobian(model, x, tmp_path / "j.zarr", causal=True, progress=False)
    msg = str(info.value)
    assert "causal=True promises" in msg and "output step 0 depends on the later input step" in msg
    assert "d y[0, 0, :] / d x[0, " in msg and "reaches" in msg
    assert "causal='auto'" in msg and "use_causal_mask=True" in msg and "causal='trust'" in msg
    assert not (tmp_path / "j.zarr").exists()


def test_trust_skips_the_check(tmp_path):
    """causal="trust" is taken at its word: on this model the entries above the diagonal,
    which are not zero, are left out, and each block sees only a prefix of the inputs, so
    the rest is wrong too (why causal=True checks)."""
    model = _attention(mask=False)
    x = np.random.default_rng(8).normal(size=(2, 12, 2)).astype("float32")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", causal="trust", block_size=1,
                           progress=False)
    assert J.attrs["causal"] is True and "not checked" in J.attrs["causal_reason"]
    ref = reference_jacobian(model, x)
    lower = np.tril(np.ones((12, 12), bool))
    got, want = J[...].transpose(0, 2, 4, 1, 3), ref.transpose(0, 2, 4, 1, 3)
    assert np.all(got[..., ~lower] == 0) and np.any(want[..., ~lower] != 0)
    assert not np.allclose(got[..., lower], want[..., lower], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["masked_attention", "tf_function", "lstm_dense"])
def test_a_kept_causal_promise_is_exact_and_says_how_it_was_checked(name, tmp_path):
    model = _attention(mask=True) if name == "masked_attention" else build_model(name)[0]
    f_in = 1 if name == "lstm_dense" else 2
    x = np.random.default_rng(9).normal(size=(2, 20, f_in)).astype("float32")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", causal=True, block_size=5,
                           progress=False)
    assert J.attrs["causal"] is True and J.plan.causal
    reason = J.attrs["causal_reason"]
    # Keras' own recurrent chains are causal by construction: no numerical check
    assert ("by construction" if name == "lstm_dense" else "checked numerically") in reason
    assert_jacobian_close(J[...], reference_jacobian(model, x), name)
