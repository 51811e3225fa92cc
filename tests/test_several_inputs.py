"""Models of several inputs: the Jacobian with respect to one, the others passed along.

A sequence input and a static vector (the attribution users' case), as a dict by
input name and as a list in the model's order, in every strategy, compared with
``tf.GradientTape.batch_jacobian`` of the same model on the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_jacobian_close

import jacstream
from jacstream.errors import InputError, ModelError, StoreMismatchError, StrategyUnavailable

B, T, F, S = 3, 12, 2, 3


def seq_static_model():
    """LSTM over the sequence, plus a Dense of the static vector added at every step."""
    import keras

    keras.utils.set_random_seed(7)
    seq = keras.Input((None, F), name="seq")
    static = keras.Input((S,), name="static")
    h = keras.layers.LSTM(6, return_sequences=True)(seq)
    s = keras.layers.Dense(6, activation="tanh")(static)
    h = keras.layers.Add()([h, keras.layers.RepeatVector(T)(s)])
    return keras.Model([seq, static], keras.layers.Dense(2)(h))


@pytest.fixture(scope="module")
def job():
    import tensorflow as tf

    model = seq_static_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, F)).astype("float32")
    s = rng.normal(size=(B, S)).astype("float32")
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model([xt, tf.constant(s)])
    return model, x, s, tape.batch_jacobian(y, xt).numpy()


FORMS = {"dict": lambda x, s: ({"seq": x, "static": s}, "seq"),
         "list": lambda x, s: ([x, s], 0),
         "tuple": lambda x, s: ((x, s), 0)}


@pytest.mark.parametrize("strategy", ["pfor", "tile", "forward", "auto"])
@pytest.mark.parametrize("form", ["dict", "list"])
def test_jacobian_wrt_the_sequence_matches_batch_jacobian(job, tmp_path, strategy, form):
    model, x, s, ref = job
    inputs, wrt = FORMS[form](x, s)
    # one example per block: every block needs its own examples' static vectors
    J = jacstream.jacobian(model, inputs, tmp_path / "j.zarr", wrt=wrt, strategy=strategy,
                           block_size=5, examples_per_block=1, progress=False)
    assert_jacobian_close(J[...], ref, f"{form} {strategy}")
    if strategy == "auto":
        notes = " ".join(J.attrs["strategy_choice"]["notes"])
        assert "sensitivity unavailable" in notes and "several inputs" in notes


def test_tuple_form_and_one_block(job, tmp_path):
    model, x, s, ref = job
    J = jacstream.jacobian(model, (x, s), tmp_path / "j.zarr", wrt=0, strategy="tile",
                           progress=False)
    assert_jacobian_close(J[...], ref, "tuple")


def test_sensitivity_refuses_several_inputs_and_names_the_others(job, tmp_path):
    model, x, s, _ = job
    with pytest.raises(StrategyUnavailable, match="several inputs"):
        jacstream.jacobian(model, {"seq": x, "static": s}, tmp_path / "j.zarr", wrt="seq",
                           strategy="sensitivity", progress=False)


def test_resume_and_changed_side_inputs(job, tmp_path):
    model, x, s, ref = job
    path = tmp_path / "j.zarr"

    class Stop(Exception):
        pass

    def stop_after_two(block, seen=[]):   # noqa: B006 - counts blocks across the call
        seen.append(block)
        if len(seen) == 2:
            raise Stop

    opts = {"wrt": "seq", "strategy": "tile", "block_size": 4, "progress": False}
    with pytest.raises(Stop):
        jacstream.jacobian(model, {"seq": x, "static": s}, path, on_block=stop_after_two,
                           **opts)
    with pytest.raises(StoreMismatchError):   # other static inputs: another job
        jacstream.jacobian(model, {"seq": x, "static": s + 1}, path, **opts)
    J = jacstream.jacobian(model, {"seq": x, "static": s}, path, **opts)
    assert len(J.stats["computed_blocks"]) == J.plan.n_blocks - 2   # resumed
    assert_jacobian_close(J[...], ref, "resumed")


@pytest.mark.parametrize(("inputs", "wrt", "match"), [
    ("one", None, r"the model has 2 inputs but inputs is one array.*wrt='seq'"),
    ("dict", None, r"wrt is missing.*'seq' \(shape \(3, 12, 2\)\), 'static' \(shape \(3, 3\)\)"),
    ("dict", "other", r"wrt is 'other'.*one of 'seq'"),
    ("list", 2, r"wrt is 2.*one of 0 .*1 "),
    ("short", "seq", r"input 'static' has 2 examples.*input 'seq' has 3"),
])
def test_bad_several_inputs(job, tmp_path, inputs, wrt, match):
    model, x, s, _ = job
    given = {"one": x, "dict": {"seq": x, "static": s}, "list": [x, s],
             "short": {"seq": x, "static": s[:2]}}[inputs]
    with pytest.raises(InputError, match=match):
        jacstream.jacobian(model, given, tmp_path / "j.zarr", wrt=wrt, progress=False)
    assert not (tmp_path / "j.zarr").exists()


def test_wrt_with_one_array_is_refused(tmp_path):
    with pytest.raises(InputError, match="leave wrt out"):
        jacstream.jacobian(lambda v: v * 2, np.ones((1, 3, 1), "float32"), tmp_path / "j",
                           wrt=0, progress=False)


def test_closure_over_the_whole_batch_names_the_supported_form(job, tmp_path):
    import tensorflow as tf

    model, x, s, _ = job
    static = tf.constant(s)

    def closed(v):   # the static vectors of all examples: a block has fewer
        return model([v, static])

    with pytest.raises(ModelError, match=r"wrt='seq'"):
        jacstream.jacobian(closed, x, tmp_path / "j.zarr", progress=False)


def test_timedistributed_head_is_applied_pointwise_with_several_inputs(tmp_path):
    """The faster call path (TimeDistributed(Dense) applied pointwise) is kept, checked on
    the sample with its static vectors."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(8)
    seq, static = keras.Input((None, F), name="seq"), keras.Input((S,), name="static")
    h = keras.layers.GRU(5, return_sequences=True)(seq)
    h = keras.layers.Concatenate()([h, keras.layers.RepeatVector(T)(static)])
    model = keras.Model({"seq": seq, "static": static},
                        keras.layers.TimeDistributed(keras.layers.Dense(2))(h))
    rng = np.random.default_rng(3)
    x, s = rng.normal(size=(B, T, F)).astype("float32"), rng.normal(size=(B, S)).astype("float32")
    J = jacstream.jacobian(model, {"seq": x, "static": s}, tmp_path / "j.zarr", wrt="seq",
                           strategy="pfor", block_size=6, progress=False)
    assert any("TimeDistributed" in r for r in J.attrs["model_rewrites"])
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model({"seq": xt, "static": tf.constant(s)})
    assert_jacobian_close(J[...], tape.batch_jacobian(y, xt).numpy(), "pointwise head")
