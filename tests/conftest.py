"""Shared test fixtures: the model table, references and the tolerance helper."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

# One place for tolerances. Two *different* computations of the same float32 values (another
# strategy, kernel, block size, op order, a cuDNN-free copy, tf.GradientTape.batch_jacobian)
# agree only to float32 rounding, and how the last bits fall depends on the CPU (AVX-512 or
# AVX2-only), oneDNN on or off and the thread count (shared/NOTES.md, "Machines differ"):
# compare them with assert_jacobian_close. Bitwise assertions are kept only where the very
# same computation is repeated (or stored bytes are read back), each with a comment saying why.
RTOL = 1e-5
ATOL_REL = 1e-5  # absolute tolerance, relative to the largest finite |entry| of the reference
# The same for two different float64 computations (a model built in float64).
RTOL_FLOAT64 = ATOL_REL_FLOAT64 = 1e-12


def assert_jacobian_close(actual, expected, what: str = "", precision: str = "float32") -> None:
    """Assert two results of different float32 computations agree to float32 rounding.

    For Jacobians and any other float32 results (model outputs, reductions). Shapes must
    match; NaN must be NaN at the same places. ``precision="float64"``: two float64
    computations, to float64 rounding (a model built in float64).
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    finite = np.abs(expected[np.isfinite(expected)])
    scale = float(finite.max()) if finite.size else 0.0
    rtol, atol = (RTOL, ATOL_REL) if precision == "float32" else (RTOL_FLOAT64, ATOL_REL_FLOAT64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * max(scale, 1e-30),
                               err_msg=what)


def reference_jacobian(model, x: np.ndarray) -> np.ndarray:
    """The full per-example Jacobian by tf.GradientTape.batch_jacobian (eager).

    Outputs ``(batch, F_out)`` are one output step, as jacstream lays them out:
    ``(batch, 1, F_out, T, F_in)``.
    """
    import tensorflow as tf

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model(xt)
    jac = tape.batch_jacobian(y, xt).numpy()
    return jac[:, None] if y.shape.rank == 2 else jac


# --------------------------------------------------------------------------- model table
def _keras():
    import keras

    keras.utils.set_random_seed(1234)
    return keras


def build_model(name: str):
    """Build a model of the table by name; returns (model, F_in, F_out, is_causal)."""
    keras = _keras()
    L = keras.layers
    if name == "lstm_td":       # the reference model of shared/NOTES.md
        inp = keras.Input((None, 1))
        h = L.LSTM(32, return_sequences=True)(inp)
        return keras.Model(inp, L.TimeDistributed(L.Dense(1))(h)), 1, 1, True
    if name == "lstm_dense":
        inp = keras.Input((None, 1))
        h = L.LSTM(32, return_sequences=True)(inp)
        return keras.Model(inp, L.Dense(1)(h)), 1, 1, True
    if name == "stacked":       # F_in=3, F_out=2
        m = keras.Sequential([keras.Input((None, 3)), L.LSTM(16, return_sequences=True),
                              L.LSTM(8, return_sequences=True), L.Dense(2)])
        return m, 3, 2, True
    if name == "gru":
        inp = keras.Input((None, 2))
        h = L.GRU(12, return_sequences=True)(inp)
        return keras.Model(inp, L.Dense(1)(h)), 2, 1, True
    if name == "conv_causal":
        m = keras.Sequential([keras.Input((None, 2)),
                              L.Conv1D(6, 3, padding="causal", dilation_rate=2,
                                       activation="tanh"),
                              L.Conv1D(2, 2, padding="causal")])
        return m, 2, 2, True
    if name == "tf_function":   # a plain Python function of TF ops
        import tensorflow as tf

        rng = np.random.default_rng(7)
        w1 = tf.constant(rng.normal(size=(2, 3)).astype("float32"))
        w2 = tf.constant(rng.normal(size=(3, 2)).astype("float32"))

        def f(x):
            h = tf.tanh(tf.cumsum(tf.einsum("btf,fg->btg", x, w1), axis=1) * 0.3)
            return tf.einsum("btg,gh->bth", h * h + h, w2)

        return f, 2, 2, True
    # Non-causal models (causal="auto" must not truncate them)
    if name == "bilstm":
        m = keras.Sequential([keras.Input((None, 1)),
                              L.Bidirectional(L.LSTM(6, return_sequences=True)), L.Dense(1)])
        return m, 1, 1, False
    if name == "conv_same":
        m = keras.Sequential([keras.Input((None, 1)), L.Conv1D(4, 5, padding="same"),
                              L.Dense(1)])
        return m, 1, 1, False
    if name == "last_step":     # every output looks at the last input step
        import tensorflow as tf

        inp = keras.Input((None, 1))
        h = L.LSTM(8, return_sequences=True)(inp)

        class AddLast(L.Layer):
            def call(self, h):
                return h + h[:, -1:, :]

        return keras.Model(inp, L.Dense(1)(AddLast()(h))), 1, 1, False
    # Output lengths other than the input's (T_out != T_in; causal="auto" must not truncate)
    if name == "seq_to_one":    # a forecaster returning (batch, F_out): one output step
        m = keras.Sequential([keras.Input((None, 2)), L.LSTM(4), L.Dense(3)])
        return m, 2, 3, False
    if name == "horizon":       # a window mapped to a horizon of 4 steps x 2 features
        m = keras.Sequential([keras.Input((None, 2)), L.LSTM(4), L.Dense(8),
                              L.Reshape((4, 2))])
        return m, 2, 2, False
    if name == "strided":       # T_out = (T - 3) // 2 + 1
        m = keras.Sequential([keras.Input((None, 2)), L.Conv1D(3, 3, strides=2),
                              L.GRU(4, return_sequences=True)])
        return m, 2, 4, False
    raise KeyError(name)


CAUSAL_MODELS = ["lstm_td", "lstm_dense", "stacked", "gru", "conv_causal", "tf_function"]
NONCAUSAL_MODELS = ["bilstm", "conv_same", "last_step"]
OTHER_LENGTH_MODELS = ["seq_to_one", "horizon", "strided"]   # T_out != T_in

_cache: dict[str, tuple] = {}


@pytest.fixture
def model_case(request):
    """(model, x, reference Jacobian, is_causal) for the model named by the param."""
    name = request.param
    if name not in _cache:
        model, f_in, _f_out, causal = build_model(name)
        T = 23
        x = np.random.default_rng(0).normal(size=(3, T, f_in)).astype("float32")
        _cache[name] = (model, x, reference_jacobian(model, x), causal)
    return _cache[name]
