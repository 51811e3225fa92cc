"""The pfor tracing speed-up (jacstream/_pfor.py): same Jacobians, one conversion per loop."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from conftest import assert_jacobian_close, reference_jacobian

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tensorflow.python.eager import def_function  # noqa: E402
from tensorflow.python.ops.parallel_for import pfor as pfor_lib  # noqa: E402

import jacstream  # noqa: E402
from jacstream.engine.pfor import fast_pfor_tracing, rows_dependent_outputs  # noqa: E402


def test_dependence_follows_data_and_stops_at_shapes():
    @tf.function
    def body(a, b, c):
        return a * 2.0, b + tf.cast(tf.shape(a)[0], tf.float32), c, tf.reduce_sum(a) + b

    g = body.get_concrete_function(tf.TensorSpec([None]), tf.TensorSpec([]),
                                   tf.TensorSpec([])).graph
    assert rows_dependent_outputs(g, {0}) == {0, 3}      # output 1 only sees a's shape
    assert rows_dependent_outputs(g, {1}) == {1, 3}
    assert rows_dependent_outputs(g, {2}) == {2}
    assert rows_dependent_outputs(g, set()) == set()


def _count_conversions(monkeypatch):
    calls = []
    original = pfor_lib.WhileV2.__call__

    def counting(self):
        calls.append(self._pfor_input.op.name)
        return original(self)

    monkeypatch.setattr(pfor_lib.WhileV2, "__call__", counting)
    return calls


@pytest.mark.parametrize("layer", ["LSTM", "GRU"])
def test_each_loop_is_converted_once_and_exactly(layer, monkeypatch):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((None, 2)),
                              getattr(keras.layers, layer)(6, return_sequences=True),
                              keras.layers.Dense(1)])
    x = np.random.default_rng(1).normal(size=(3, 9, 2)).astype("float32")
    calls = _count_conversions(monkeypatch)

    @tf.function
    def jac(x):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            y = model(x)
        with fast_pfor_tracing():
            return tape.batch_jacobian(y, x)

    got = jac(tf.constant(x)).numpy()
    # One while loop (the RNN's gradient) and one conversion of it: pfor's own
    # retry after stacking the carried gradient state did not happen.
    assert len(calls) == 1, calls
    assert_jacobian_close(got, reference_jacobian(model, x), layer)


def test_tensorflow_is_left_as_it_was():
    call, module = pfor_lib.WhileV2.__call__, pfor_lib.def_function
    with fast_pfor_tracing():
        assert pfor_lib.WhileV2.__call__ is not call
        with fast_pfor_tracing():   # re-entrant
            pass
        assert pfor_lib.def_function is not module
    assert pfor_lib.WhileV2.__call__ is call
    assert pfor_lib.def_function is def_function


def _masked_lstm():
    inp = keras.Input((None, 2))
    h = keras.layers.Masking(mask_value=0.0)(inp)
    h = keras.layers.LSTM(5, return_sequences=True)(h)
    return keras.Model(inp, keras.layers.Dense(2)(h))


class _ShapeCell(keras.layers.Layer):
    """A custom RNN cell whose step uses its input's shape (a shape-only dependence)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], self.units), name="w")
        self.u = self.add_weight(shape=(self.units, self.units), name="u")

    def call(self, x, states):
        n = tf.cast(tf.shape(x)[-1], x.dtype)
        h = tf.tanh(x @ self.w / n + states[0] @ self.u)
        return h, [h]


def _nested_loop(x):
    # A Python function with its own while loop whose state is a running sum.
    def body(t, acc, out):
        acc = 0.5 * acc + tf.sin(x[:, t])
        return t + 1, acc, out.write(t, acc * acc)

    n = tf.shape(x)[1]
    _, _, out = tf.while_loop(lambda t, *_: t < n, body,
                              (0, tf.zeros_like(x[:, 0]), tf.TensorArray(x.dtype, size=n)))
    return tf.transpose(out.stack(), [1, 0, 2])


@pytest.mark.parametrize("name", ["masked", "custom_cell", "backwards", "while_loop"])
def test_other_loops_match_batch_jacobian(name, tmp_path):
    keras.utils.set_random_seed(3)
    x = np.random.default_rng(2).normal(size=(3, 11, 2)).astype("float32")
    if name == "masked":
        model = _masked_lstm()
        x[1, 7:] = 0.0    # padded tail: masked steps
    elif name == "custom_cell":
        model = keras.Sequential([keras.Input((None, 2)),
                                  keras.layers.RNN(_ShapeCell(4), return_sequences=True),
                                  keras.layers.Dense(1)])
    elif name == "backwards":
        model = keras.Sequential([keras.Input((None, 2)),
                                  keras.layers.SimpleRNN(4, return_sequences=True,
                                                         go_backwards=True),
                                  keras.layers.Dense(2)])
    else:
        model = _nested_loop
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="pfor", causal=False,
                           block_size=4, progress=False)
    assert_jacobian_close(J[...], reference_jacobian(model, x), name)


def _loop_model(name):
    keras.utils.set_random_seed(3)
    if name == "masked":
        return _masked_lstm(), 2
    if name == "custom_cell":
        return keras.Sequential([keras.Input((None, 2)),
                                 keras.layers.RNN(_ShapeCell(4), return_sequences=True),
                                 keras.layers.Dense(1)]), 2
    if name == "backwards":
        return keras.Sequential([keras.Input((None, 2)),
                                 keras.layers.SimpleRNN(4, return_sequences=True,
                                                        go_backwards=True),
                                 keras.layers.Dense(2)]), 2
    if name == "while_loop":
        return _nested_loop, 2
    from conftest import build_model

    model, f_in, _, _ = build_model(name)
    return model, f_in


@pytest.mark.parametrize("name", ["masked", "custom_cell", "backwards", "while_loop",
                                  "stacked", "bilstm", "gru", "last_step"])
def test_stacks_what_pfors_own_retry_stacks(name, monkeypatch):
    """The loop inputs stacked up front are exactly those pfor stacks after its first try."""
    model, f_in = _loop_model(name)
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 11, f_in)).astype("float32"))
    stacked: list[tuple[str, list[int]]] = []
    original = pfor_lib._PforInput.stack_inputs

    def recording(self, stack_indices=None, tile_variants=False):
        if self.op.type in ("While", "StatelessWhile") and stack_indices is not None:
            stacked.append((self.op.name, sorted(stack_indices)))
        return original(self, stack_indices, tile_variants)

    monkeypatch.setattr(pfor_lib._PforInput, "stack_inputs", recording)
    def make_jac(fast):
        @tf.function
        def jac(x):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(x)
                y = model(x)
            with fast_pfor_tracing() if fast else contextlib.nullcontext():
                return tape.batch_jacobian(y, x)
        return jac

    results = {}
    for fast in (False, True):
        stacked.clear()
        jacobian = make_jac(fast)(x).numpy()
        results[fast] = (list(stacked), jacobian)
    (plain_stacks, plain), (fast_stacks, fast_jac) = results[False], results[True]
    assert plain_stacks, "pfor retried no loop conversion: nothing to compare"
    assert fast_stacks == plain_stacks
    # Bitwise: with the same inputs stacked, pfor converts the loop into the same ops, so both
    # graphs are the same computation; a tolerance would hide a conversion that differs.
    np.testing.assert_array_equal(fast_jac, plain)
