"""The forward-sensitivity strategy: exactness on recurrent chains, fallbacks, zeros, traces.

Every model is compared with ``tf.GradientTape.batch_jacobian``. The traced
chunk is cut to 8 steps here, so that sequences of 23 steps take three chunks
(the last one partial and padded) and both ways of carrying old columns run:
chunk propagators (a narrow state, or one narrower than the sequence) and step by
step (a state wider than the sequence and than ``NARROW_STATE``).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_jacobian_close, build_model, reference_jacobian

import jacstream
from jacstream.engine.strategies import FunctionSpec
from jacstream.engine.strategies import sensitivity as _sensitivity
from jacstream.errors import ModelError, StrategyUnavailable
from jacstream.planning import choice as _strategy

T = 23   # three chunks of 8 steps, the last one partial


@pytest.fixture(autouse=True)
def _fresh_strategy_cache(monkeypatch):
    monkeypatch.setattr(_sensitivity, "CHUNK", 8)
    _strategy.clear_cache()
    yield
    _strategy.clear_cache()


def _keras():
    import keras

    keras.utils.set_random_seed(11)
    return keras


def _custom_cell_model():
    keras = _keras()

    @keras.saving.register_keras_serializable(package="jacstream_tests")
    class MinimalRNNCell(keras.layers.Layer):
        """The Keras guide's minimal cell: h' = tanh(x W + h U)."""

        def __init__(self, units: int, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.state_size = units

        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], self.units),
                                          initializer="glorot_uniform", name="kernel")
            self.recurrent_kernel = self.add_weight(shape=(self.units, self.units),
                                                    initializer="orthogonal", name="rec")

        def call(self, inputs, states):
            import keras as k

            h = k.ops.tanh(k.ops.matmul(inputs, self.kernel)
                           + k.ops.matmul(states[0], self.recurrent_kernel))
            return h, [h]

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    L = keras.layers
    return keras.Sequential([keras.Input((None, 2)), L.RNN(MinimalRNNCell(5),
                                                             return_sequences=True),
                             L.Dense(2)])


def _model(name: str):
    """(model, F_in) of the sensitivity table."""
    if name in ("lstm_td", "lstm_dense", "stacked", "gru"):
        model, f_in, _, _ = build_model(name)
        return model, f_in
    keras = _keras()
    L = keras.layers
    if name == "simple_rnn":
        return keras.Sequential([keras.Input((None, 2)), L.SimpleRNN(7, return_sequences=True),
                                 L.Dense(1)]), 2
    if name == "custom_cell":
        return _custom_cell_model(), 2
    if name == "gru_reset_before":      # not in closed form: the cell's Jacobian by autodiff
        return keras.Sequential([keras.Input((None, 2)),
                                 L.GRU(6, return_sequences=True, reset_after=False),
                                 L.Dense(2)]), 2
    if name == "nonlinear_head":
        return keras.Sequential([keras.Input((None, 3)), L.LSTM(6, return_sequences=True),
                                 L.Dense(16, activation="relu"), L.Dense(2)]), 3
    if name == "dense_pre":             # per-step layers before, between and after
        return keras.Sequential([keras.Input((None, 2)), L.Dense(5, activation="tanh"),
                                 L.GRU(6, return_sequences=True), L.LayerNormalization(),
                                 L.Dropout(0.3), L.LSTM(4, return_sequences=True),
                                 L.TimeDistributed(L.Dense(3))]), 2
    if name == "wide_state":            # state (2 x 72) wider than the sequence and than
        # NARROW_STATE: old columns step by step
        return keras.Sequential([keras.Input((None, 1)), L.LSTM(72, return_sequences=True),
                                 L.Dense(1)]), 1
    raise KeyError(name)


MODELS = ["lstm_td", "lstm_dense", "stacked", "gru", "simple_rnn", "custom_cell",
          "gru_reset_before", "nonlinear_head", "dense_pre", "wide_state"]
_cache: dict[str, tuple] = {}


def _case(name: str):
    if name not in _cache:
        model, f_in = _model(name)
        x = np.random.default_rng(2).normal(size=(3, T, f_in)).astype("float32")
        _cache[name] = (model, x, reference_jacobian(model, x))
    return _cache[name]


@pytest.mark.parametrize("name", MODELS)
def test_sensitivity_matches_batch_jacobian(name, tmp_path):
    model, x, ref = _case(name)
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="sensitivity",
                           progress=False)
    assert J.plan.strategy == "sensitivity" and J.complete
    assert_jacobian_close(J[...], ref, name)


@pytest.mark.parametrize(("name", "out_steps", "block_size", "epb"), [
    ("lstm_td", None, 1, None),
    ("lstm_td", -1, None, None),                  # one output step, the last
    ("stacked", slice(3, 20, 4), 3, 2),           # F_in=3, F_out=2, slabs of examples
    ("gru", [0, 5, 7, 8, 9, 22], 2, 1),           # across chunk boundaries
    ("nonlinear_head", 12, None, None),           # one output step inside a chunk
    ("dense_pre", slice(None, None, 10), 4, None),
])
def test_sensitivity_blockings_match_batch_jacobian(name, out_steps, block_size, epb,
                                                    tmp_path):
    model, x, ref = _case(name)
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="sensitivity",
                           block_size=block_size, examples_per_block=epb, out_steps=out_steps,
                           progress=False)
    assert_jacobian_close(J[...], ref[:, J.out_steps], f"{name} {out_steps}")


def _function(model, f_in, f_out=1):
    spec = FunctionSpec("sensitivity", "sensitivity", f_in, f_out, "/job:localhost/replica:0/"
                        "task:0/device:CPU:0")
    return _sensitivity.Sensitivity(model, spec)


def test_both_sweep_modes_run():
    """The table covers propagators (narrow state) and steps (a wide state, wider than T)."""
    narrow, _ = _model("gru")
    wide, _ = _model("wide_state")
    assert _function(narrow, 2).modes((3, T)) == (8, True)
    assert _function(wide, 1).modes((3, T)) == (8, False)
    assert _function(wide, 1).modes((3, 200)) == (8, True)     # a longer sequence: propagators


def test_traces_do_not_grow_with_blocks(tmp_path):
    model, x, _ = _case("lstm_td")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="sensitivity",
                           block_size=2, progress=False)
    assert J.plan.n_blocks >= 12
    # one forward pass and one chunk function, whatever the number of blocks
    assert J.stats["traces"] <= 2


@pytest.mark.parametrize("name", ["conv_causal", "tf_function", "bilstm", "last_step"])
def test_models_outside_the_set_fall_back_with_a_reason(name, tmp_path):
    model, f_in, _, _ = build_model(name)
    x = np.random.default_rng(0).normal(size=(2, 20, f_in)).astype("float32")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", progress=False)
    assert J.plan.strategy != "sensitivity"
    notes = " ".join(J.attrs["strategy_choice"]["notes"])
    if name in ("bilstm", "last_step"):   # recurrent: considered, and refused with a reason
        assert "sensitivity unavailable" in notes
    assert_jacobian_close(J[...], reference_jacobian(model, x), name)
    with pytest.raises(ModelError, match="sensitivity|decompos|recurrent|chain|layer"):
        jacstream.jacobian(model, x, tmp_path / "s.zarr", strategy="sensitivity",
                           progress=False)


def test_attention_model_falls_back(tmp_path):
    keras = _keras()
    L = keras.layers
    inp = keras.Input((None, 2))
    h = L.LSTM(6, return_sequences=True)(inp)
    a = L.MultiHeadAttention(num_heads=1, key_dim=4)(h, h, use_causal_mask=True)
    model = keras.Model(inp, L.Dense(1)(a))
    x = np.random.default_rng(0).normal(size=(2, 20, 2)).astype("float32")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", progress=False)
    assert J.plan.strategy != "sensitivity"
    assert "sensitivity unavailable" in " ".join(J.attrs["strategy_choice"]["notes"])
    assert_jacobian_close(J[...], reference_jacobian(model, x), "attention")


def test_auto_picks_sensitivity_for_a_recurrent_chain(tmp_path):
    model, x, ref = _case("lstm_td")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", progress=False)
    assert J.plan.strategy == "sensitivity"
    assert J.attrs["strategy_choice"]["strategy"] == "sensitivity"
    assert_jacobian_close(J[...], ref, "auto")


def test_exact_zeros_are_dropped_and_stay_exact(tmp_path):
    """Gradients that underflow to exactly 0.0 drop their columns; the result is unchanged."""
    keras = _keras()
    L = keras.layers
    model = keras.Sequential([keras.Input((None, 1)),
                              L.SimpleRNN(4, return_sequences=True,
                                          recurrent_initializer=keras.initializers.Orthogonal(
                                              gain=1e-9)),
                              L.Dense(1)])
    x = np.random.default_rng(3).normal(size=(2, 90, 1)).astype("float32")
    ref = reference_jacobian(model, x)
    lags = np.arange(90)[:, None] - np.arange(90)[None, :]
    assert np.all(ref[:, :, 0, :, 0][:, lags > 8] == 0)   # the gradients die within a few steps
    fn = _function(model, 1)
    J = fn(x, np.arange(90), 90)[0]
    assert_jacobian_close(J, ref, "underflowing gradients")
    assert np.all(J[:, :, 0, :, 0][:, lags > 8] == 0)
    assert fn.dropped_columns > 0.8 * 90 * 89 / 2


def test_validation_refuses_a_model_it_does_not_reproduce():
    """A layer that claims to be per-step but is not (here: a subclass that mixes steps)."""
    keras = _keras()
    L = keras.layers

    class Leaky(L.Dense):
        def call(self, x):
            import keras as k

            y = super().call(x)
            return y + k.ops.cumsum(y, axis=1) * 0.5   # depends on earlier steps

    model = keras.Sequential([keras.Input((None, 1)), L.LSTM(4, return_sequences=True),
                              Leaky(1)])
    x = np.random.default_rng(0).normal(size=(2, 20, 1)).astype("float32")
    fn = _function(model, 1)
    with pytest.raises(StrategyUnavailable, match="reproduce|differs"):
        fn.check(x[:, :16])


def test_interrupted_run_resumes_to_the_same_bits(tmp_path):
    """A run stopped after some blocks resumes: the sweep starts again from step 0 without
    rewriting the stored blocks; the same computation, so bitwise the same result."""
    model, x, ref = _case("gru")
    clean = jacstream.jacobian(model, x, tmp_path / "clean.zarr", strategy="sensitivity",
                               block_size=3, progress=False)

    class Stop(Exception):
        pass

    seen: list[int] = []

    def stop_after_four(block):
        seen.append(block.index)
        if len(seen) == 4:
            raise Stop

    path = tmp_path / "j.zarr"
    with pytest.raises(Stop):
        jacstream.jacobian(model, x, path, strategy="sensitivity", block_size=3,
                           progress=False, on_block=stop_after_four)
    J = jacstream.jacobian(model, x, path, strategy="sensitivity", block_size=3,
                           progress=False)
    assert J.stats["blocks_skipped"] >= 4
    assert np.asarray(J[...]).tobytes() == np.asarray(clean[...]).tobytes()
    assert_jacobian_close(J[...], ref, "resumed")


def test_process_settings_are_put_back(tmp_path):
    """The job freezes the garbage collector's old objects and the sweep turns Grappler
    off for its own calls; both are the process's settings, and both come back."""
    import gc

    import tensorflow as tf

    model, x, ref = _case("lstm_td")
    during: list[int] = []
    frozen_before = gc.get_freeze_count()
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="sensitivity",
                           block_size=4, progress=False,
                           on_block=lambda info: during.append(gc.get_freeze_count()))
    assert during and min(during) > frozen_before     # frozen while the blocks ran
    assert gc.get_freeze_count() == frozen_before
    assert not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer")
    assert_jacobian_close(J[...], ref, "lstm_td")


def _masked(kind: str):
    """Masked models (padded sequences): Keras carries every RNN's state through a step
    whose features all equal the mask value."""
    keras = _keras()
    L = keras.layers
    if kind == "stacked":          # Sequential, two RNNs, the first with carried outputs
        return keras.Sequential([keras.Input((None, 2)), L.Masking(0.0),
                                 L.LSTM(6, return_sequences=True),
                                 L.GRU(4, return_sequences=True), L.Dense(2)]), 2, 0.0
    if kind == "zero_output":      # outputs of masked steps are zeros, not carried
        return keras.Sequential([keras.Input((None, 1)), L.Masking(0.0),
                                 L.LSTM(5, return_sequences=True, zero_output_for_mask=True),
                                 L.Dense(16, activation="relu"), L.Dense(2)]), 1, 0.0
    inp = keras.Input((None, 1))   # functional: Keras computes the mask with ops beside
    h = L.Dense(3, activation="tanh")(L.Masking(-1.0)(inp))
    h = L.SimpleRNN(5, return_sequences=True)(h)
    return keras.Model(inp, L.TimeDistributed(L.Dense(1))(h)), 1, -1.0


@pytest.mark.parametrize("kind", ["stacked", "zero_output", "functional"])
@pytest.mark.parametrize("block_size", [None, 4])
def test_masked_sequences_match_batch_jacobian(kind, block_size, tmp_path):
    model, f_in, value = _masked(kind)
    x = np.random.default_rng(5).normal(size=(3, T, f_in)).astype("float32")
    x[0, 0] = value        # the first step masked: the outputs start from the initial state
    x[1, 15:] = value      # a padded tail
    x[2, 6:9] = value      # masked steps inside
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", block_size=block_size,
                           progress=False)
    assert J.plan.strategy == "sensitivity"
    assert J.attrs["strategy_choice"]["sensitivity_chain"].startswith("Masking(")
    ref = reference_jacobian(model, x)
    assert np.all(ref[2, :, :, 6:9] == 0)    # masked inputs move nothing ...
    assert_jacobian_close(J[...], ref, f"masked {kind}")
    assert np.all(J[2, :, :, 6:9] == 0)      # ... here either


def test_masked_check_runs_masked_steps():
    """The check also runs a copy of the prefix with masked steps: a chain that masks the
    wrong steps (here: told the wrong mask value) is refused, though the prefix itself has
    no masked step."""
    model, f_in, _ = _masked("stacked")
    x = np.random.default_rng(6).normal(size=(2, 16, f_in)).astype("float32")
    _function(model, f_in, 2).check(x)          # the right mask value: accepted
    wrong = _function(model, f_in, 2)
    wrong.chain.mask_value = 7.0                 # before anything is traced
    with pytest.raises(StrategyUnavailable, match="with masked steps"):
        wrong.check(x)


def test_a_mask_after_other_layers_is_not_swept(tmp_path):
    keras = _keras()
    L = keras.layers
    model = keras.Sequential([keras.Input((None, 1)), L.Dense(2), L.Masking(0.0),
                              L.LSTM(3, return_sequences=True), L.Dense(1)])
    x = np.random.default_rng(7).normal(size=(2, 12, 1)).astype("float32")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", progress=False)
    assert J.plan.strategy != "sensitivity"
    assert "masks steps" in " ".join(J.attrs["strategy_choice"]["notes"])
    assert_jacobian_close(J[...], reference_jacobian(model, x), "mask after a layer")
