"""Strategies: forward mode on the model table, strategy="auto", storage dtypes, devices.

pfor and tile run the whole exactness table in test_core.py; here forward mode
does, with its own blocking (blocks of input steps), and "auto" is checked
for what it records and keeps.
"""

from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys

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
from jacstream.errors import DeviceError, InputError, NonFiniteError
from jacstream.planning import CostModel, Plan, make_plan
from jacstream.planning import choice as _strategy
from jacstream.store.jobstore import done_dir

T = 23  # the model_case fixture's sequence length
ALL_MODELS = CAUSAL_MODELS + NONCAUSAL_MODELS


@pytest.fixture(autouse=True)
def _fresh_strategy_cache():
    _strategy.clear_cache()
    yield
    _strategy.clear_cache()


def _wide_conv():
    """F_in=1 -> F_out=6: forward mode has 6x fewer columns than reverse mode has rows."""
    import keras

    keras.utils.set_random_seed(3)
    L = keras.layers
    return keras.Sequential([keras.Input((None, 1)),
                             L.Conv1D(8, 3, padding="causal", activation="tanh"),
                             L.Dense(6)])


# --------------------------------------------------------------------------- forward mode
@pytest.mark.parametrize("model_case", ALL_MODELS, indirect=True)
def test_forward_matches_batch_jacobian(model_case, tmp_path):
    model, x, ref, _ = model_case
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="forward", block_size=5,
                           progress=False)
    assert J.plan.strategy == "forward" and J.plan.axis == "in" and J.complete
    assert J.attrs["strategy_choice"]["forward_impl"] in ("accumulator", "transpose")
    assert_jacobian_close(J[...], ref, "forward")


@pytest.mark.parametrize(("name", "out_steps", "block_size", "epb"), [
    ("lstm_dense", [0, 5, 6, 22], 4, None),      # causal: early columns skip early rows
    ("stacked", slice(3, 20, 2), 3, 2),          # F_in=3, F_out=2, slabs of examples
    ("conv_same", -1, 7, None),                  # non-causal, one output step
])
def test_forward_blockings_match_batch_jacobian(name, out_steps, block_size, epb, tmp_path):
    model, f_in, _, _ = build_model(name)
    x = np.random.default_rng(4).normal(size=(3, T, f_in)).astype("float32")
    ref = reference_jacobian(model, x)
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="forward",
                           block_size=block_size, examples_per_block=epb,
                           out_steps=out_steps, progress=False)
    assert_jacobian_close(J[...], ref[:, J.out_steps], f"{name} {out_steps}")


def test_forward_trace_count_does_not_grow_with_blocks(tmp_path):
    model, f_in, _, _ = build_model("conv_causal")
    x = np.random.default_rng(1).normal(size=(2, T, f_in)).astype("float32")
    few = jacstream.jacobian(model, x, tmp_path / "a.zarr", strategy="forward", block_size=12,
                             progress=False)
    many = jacstream.jacobian(model, x, tmp_path / "b.zarr", strategy="forward", block_size=2,
                              out_steps=[3, 9, 22], progress=False)
    assert few.n_blocks == 2 and many.n_blocks == 12
    assert few.stats["traces"] == many.stats["traces"] == 1


def test_forward_on_a_model_that_needs_static_shapes(tmp_path):
    import keras

    class Subclassed(keras.Model):  # cannot be cloned: its TimeDistributed stays, static shapes
        def __init__(self):
            super().__init__()
            self.rnn = keras.layers.GRU(4, return_sequences=True)
            self.td = keras.layers.TimeDistributed(keras.layers.Dense(3))

        def call(self, x, training=False):
            return self.td(self.rnn(x))

    keras.utils.set_random_seed(2)
    model = Subclassed()
    x = np.random.default_rng(2).normal(size=(2, 13, 1)).astype("float32")
    ref = reference_jacobian(model, x)
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="forward", block_size=4,
                           out_steps=[2, 7, 12], causal=True, progress=False)
    assert J.stats["traces"] <= 3
    assert_jacobian_close(J[...], ref[:, [2, 7, 12]], "forward, static shapes")


def test_forward_implementation_is_recorded_with_why(tmp_path):
    x = np.random.default_rng(0).normal(size=(2, 12, 2)).astype("float32")
    conv, *_ = build_model("conv_causal")
    lstm, *_ = build_model("gru")
    a = jacstream.jacobian(conv, x, tmp_path / "a.zarr", strategy="forward", progress=False)
    b = jacstream.jacobian(lstm, x, tmp_path / "b.zarr", strategy="forward", progress=False)
    assert a.attrs["strategy_choice"]["forward_impl"] == "accumulator"
    # ForwardAccumulator cannot trace Keras' RNN loop (TensorList ops): the transpose of
    # reverse mode takes over, and the failure is kept.
    rec = b.attrs["strategy_choice"]
    assert rec["forward_impl"] == "transpose"
    assert any(n.startswith("accumulator") and "variant" in n for n in rec["notes"]), rec


def test_forward_plan_blocks_cover_the_needed_columns_once():
    steps = list(range(0, 1000, 7))
    p = make_plan((4, 1000, 2), (4, 1000, 3), out_steps=steps, block_size=64,
                  examples_per_block=3, causal=True, strategy="forward")
    assert p.axis == "in" and p.in_chunk == 64 and p.chunks[3] == 64
    out_chunk = p.chunks[1]
    needed = steps[-1] + 1
    assert p.n_blocks == -(-needed // 64) * 2
    covered = np.zeros((4, needed), int)
    for b in p.blocks:
        (e0, e1), (p0, p1), (c0, c1) = b.examples, b.positions, b.columns
        assert b.in_len == max(needed, c1) and c0 % 64 == 0 and p0 % out_chunk == 0
        assert p1 == len(steps)
        # rows left out are exactly zero in a causal model: outputs before the block's inputs
        assert all(s < c0 for s in steps[:p0])
        assert p0 <= bisect.bisect_left(steps, c0) < p0 + out_chunk   # first row that depends
        covered[e0:e1, c0:c1] += 1
    assert (covered == 1).all()
    # a plan stored before forward mode existed still loads, as reverse mode
    d = make_plan((2, 50, 1), (2, 50, 1), block_size=10).to_dict()
    del d["axis"], d["out_chunk"]
    old = Plan.from_dict(d)
    assert old.axis == "out" and old.chunks[1] == 10 and old.n_blocks == 5
    with pytest.raises(InputError, match="in_chunk"):
        make_plan((2, 50, 1), (2, 50, 1), block_size=10, in_chunk=20, strategy="forward")


def test_forward_budget_counts_tangent_copies():
    cost = CostModel(fixed=0, per_step=1000, per_row_step=1000, measured=True)
    fwd = make_plan((10, 1000, 1), (10, 1000, 4), memory_budget="200MiB", cost=cost,
                    strategy="forward")
    assert fwd.estimated_peak <= 200 * 2**20 * 0.8
    assert fwd.block_peak(fwd.block(0)) == fwd.estimated_peak
    bigger = make_plan((10, 1000, 1), (10, 1000, 4), memory_budget="800MiB", cost=cost,
                       strategy="forward")
    assert bigger.block_size > fwd.block_size


def test_forward_resume_recomputes_only_missing_blocks(tmp_path):
    model, f_in, _, _ = build_model("conv_causal")
    x = np.random.default_rng(5).normal(size=(3, T, f_in)).astype("float32")
    path = tmp_path / "j.zarr"
    J = jacstream.jacobian(model, x, path, strategy="forward", block_size=5, progress=False)
    full = J[...]
    for i in (1, 3):  # as if the run had died before these blocks were marked done
        os.remove(done_dir(path) / f"{i:08d}.done")
    again = jacstream.jacobian(model, x, path, progress=False)   # strategy from the store
    assert sorted(again.stats["computed_blocks"]) == [1, 3] and again.complete
    # Bitwise: the stored plan's strategy and blocking, so blocks 1 and 3 are computed again by
    # the same traced function on the same inputs and shapes, in the same process.
    np.testing.assert_array_equal(again[...], full)
    assert again.plan.strategy == "forward"


# --------------------------------------------------------------------------- auto
def test_auto_records_choice_and_is_exact(tmp_path):
    model, f_in, _, _ = build_model("lstm_dense")
    x = np.random.default_rng(6).normal(size=(3, T, f_in)).astype("float32")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", progress=False)
    rec = J.attrs["strategy_choice"]
    assert rec["strategy"] == J.plan.strategy == J.stats["strategy"]
    assert rec["strategy"] in rec["trial_seconds"] and rec["reason"].startswith(rec["strategy"])
    # a recurrent chain, F_in == F_out: the sweep and reverse mode, no forward mode
    assert set(rec["predicted_seconds"]) == {"sensitivity", "pfor", "tile"}
    assert rec["model_kind"] == "recurrent"
    assert_jacobian_close(J[...], reference_jacobian(model, x), "auto")


def test_auto_trial_times_every_candidate_and_keeps_their_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(_strategy, "TRIAL_SHARE", float("inf"))   # try everything
    model = _wide_conv()
    x = np.random.default_rng(7).normal(size=(3, 16, 1)).astype("float32")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", block_size=4, progress=False)
    rec = J.attrs["strategy_choice"]
    assert set(rec["trial_seconds"]) == {"pfor", "tile", "forward"}
    assert all(t > 0 for t in rec["trial_seconds"].values())
    assert rec["reason"].startswith(f"{J.plan.strategy}: fastest in the timed trial")
    # trial blocks on the chosen blocking were written, not computed again
    kept = {b for s, b in rec["trial_blocks"].items()
            if (s == "forward") == (J.plan.strategy == "forward")}
    assert kept and sorted(J.stats["blocks_from_trial"]) == sorted(kept)
    assert sorted(J.stats["computed_blocks"]) == list(range(J.n_blocks))
    assert_jacobian_close(J[...], reference_jacobian(model, x), "auto, all tried")
    # the same model and shapes (other values) again: the cached choice, no new trial
    x2 = x[::-1].copy()
    J2 = jacstream.jacobian(model, x2, tmp_path / "k.zarr", block_size=4, progress=False)
    rec2 = J2.attrs["strategy_choice"]
    assert rec2["cached"] is True and rec2["strategy"] == rec["strategy"]
    assert "chosen earlier in this process" in rec2["reason"]
    # The same strategy, but each example sits at another row of its block's batch (other
    # GEMM tiles): equal to float32 rounding, not bitwise.
    assert_jacobian_close(J2[...], J[...][::-1], "cached choice, examples reversed")


def test_auto_skips_trials_a_short_job_cannot_pay_for(tmp_path, monkeypatch):
    monkeypatch.setattr(_strategy, "TRIAL_SHARE", 0.0)
    model = _wide_conv()
    x = np.random.default_rng(8).normal(size=(2, 12, 1)).astype("float32")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", progress=False)
    rec = J.attrs["strategy_choice"]
    assert list(rec["trial_seconds"]) == [J.plan.strategy]
    assert sum("not tried" in n for n in rec["notes"]) == 2
    assert_jacobian_close(J[...], reference_jacobian(model, x), "auto, one tried")


def _shapes(t, f_in=1, f_out=1, kind="recurrent", n_params=4385):
    return _strategy.Shapes(10, t, f_in, f_out, tuple(range(t)), True, kind, n_params)


def test_prediction_crosses_over_where_its_lines_meet():
    """tile's cheaper trace wins short jobs and pfor's cheaper rows long ones, switching where
    trace + rate x work meet: the crossover is computed here from the registry's numbers and
    the causal work 10 * T (T + 1) / 2 (rows x input steps fed), not by predict itself."""
    from jacstream.planning.strategies import REGISTRY

    def first(s):
        names, _ = _strategy.candidates(s)
        return min(names, key=lambda c: sum(_strategy.predict(c, s)))

    # shared/NOTES reference model: the sensitivity sweep wherever it applies (see
    # test_sensitivity for the models it refuses); among reverse-mode blocks, tile's fast
    # trace wins short jobs and pfor long ones
    assert first(_shapes(300)) == first(_shapes(1000)) == "sensitivity"

    def first_reverse(s):
        names = [n for n in _strategy.candidates(s)[0] if n != "sensitivity"]
        return min(names, key=lambda c: sum(_strategy.predict(c, s)))

    tile, pfor = REGISTRY["tile"], REGISTRY["pfor"]
    per_step = _strategy.SECONDS_PER_PARAM_STEP["recurrent"] * 4385
    work = (pfor.trace["recurrent"] - tile.trace["recurrent"]) / (
        (tile.rate["recurrent"] - pfor.rate["recurrent"]) * per_step)
    t_cross = (-1 + (1 + 8 * work / 10) ** 0.5) / 2        # 10 * T (T + 1) / 2 == work
    below, above = int(t_cross) - 1, int(t_cross) + 2
    assert first_reverse(_shapes(below)) == "tile" and first_reverse(_shapes(above)) == "pfor"
    s = _shapes(above)
    assert _strategy.predict("pfor", s) == pytest.approx(
        (pfor.trace["recurrent"], pfor.rate["recurrent"] * per_step * 10 * above * (above + 1) / 2))
    # shared/NOTES reference model, among reverse-mode blocks: tile at T=300, pfor at T=1000
    assert first_reverse(_shapes(300)) == "tile" and first_reverse(_shapes(1000)) == "pfor"
    # many output features, one input feature: forward mode
    assert first(_shapes(1000, f_in=1, f_out=64, kind="feedforward", n_params=50_000)) \
        == "forward"
    names, notes = _strategy.candidates(_shapes(300, f_in=4, f_out=1))
    assert names == ["sensitivity", "pfor", "tile"] and "forward not considered" in notes[0]
    names, _ = _strategy.candidates(_shapes(300, f_in=4, kind="feedforward"))
    assert names == ["pfor", "tile"]       # the sweep is only for recurrent models


class _FakeFn:
    def __init__(self, strategy, seconds_per_step):
        self.strategy, self.seconds, self.notes, self.impl = strategy, seconds_per_step, [], "x"


def test_choose_picks_the_fastest_measured_and_skips_unavailable(monkeypatch):
    class StrategyUnavailable(Exception):
        pass

    class Clock:   # the trial's clock advances only by the simulated block times
        now = 0.0

        @classmethod
        def perf_counter(cls):
            return cls.now

    monkeypatch.setattr(_strategy, "time", Clock)

    speeds = {"pfor": 0.002, "tile": 0.0005}

    def build(name):
        if name == "forward":
            raise StrategyUnavailable("no forward derivative")
        return _FakeFn(name, speeds[name])

    def plan_for(fn):
        return make_plan((4, 40, 1), (4, 40, 1), block_size=10, strategy=fn.strategy)

    ran = []

    def run_block(fn, plan, block):
        ran.append((fn.strategy, block.index))
        Clock.now += fn.seconds * (block.positions[1] - block.positions[0])
        return ("data", block.index)

    s = _shapes(40, f_out=8)     # forward is a candidate (fewer columns than rows)
    choice = _strategy.choose(["pfor", "tile", "forward"], s, build=build, plan_for=plan_for,
                              run_block=run_block, trial_share=float("inf"),
                              unavailable=(StrategyUnavailable,))
    assert choice.strategy == "tile"
    assert any("forward unavailable" in n for n in choice.record["notes"])
    # both trials ran on different blocks of the same blocking: both are kept
    assert len({b for _, b in ran}) == 2 and set(choice.precomputed) == {b for _, b in ran}


# --------------------------------------------------------------------------- storage dtypes
@pytest.fixture(scope="module")
def f32_job(tmp_path_factory):
    model, f_in, _, _ = build_model("gru")
    x = np.random.default_rng(9).normal(size=(2, 15, f_in)).astype("float32")
    J = jacstream.jacobian(model, x, tmp_path_factory.mktemp("f32") / "j.zarr", block_size=5,
                           progress=False)
    return model, x, J[...]


# Documented bounds (jacstream/_dtypes.py): round-to-nearest, relative 2**-11 (float16,
# plus half its smallest subnormal, 2**-25, below its normal range) and 2**-8 (bfloat16).
@pytest.mark.parametrize(("dtype", "rel", "floor"), [("float16", 2.0**-11, 2.0**-25),
                                                     ("bfloat16", 2.0**-8, 0.0)])
def test_reduced_precision_storage_within_documented_error(f32_job, dtype, rel, floor,
                                                           tmp_path):
    model, x, j32 = f32_job
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", block_size=5, dtype=dtype,
                           progress=False)
    got = J[...]
    assert J.dtype.itemsize == 2 and str(J.dtype) == dtype
    meta = json.loads((tmp_path / "j.zarr" / "jacobian" / "zarr.json").read_text())
    assert meta["data_type"] == dtype
    err = np.abs(got.astype(np.float32) - j32)
    assert (err <= rel * np.abs(j32) + floor).all(), float(np.max(err / (np.abs(j32) + 1e-30)))
    # a fresh process reads it back through jacstream.open (which registers bfloat16)
    code = ("import sys, numpy as np, jacstream\n"
            "J = jacstream.open(sys.argv[1])\n"
            "print(np.asarray(J[...], dtype=np.float32).tobytes().hex())\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "j.zarr")],
                         capture_output=True, text=True, check=True)
    # Bitwise: the same stored bytes read back and widened to float32 the same way.
    assert bytes.fromhex(out.stdout.strip()) == got.astype(np.float32).tobytes()


def test_float16_refuses_values_it_would_store_as_inf(tmp_path):
    x = np.ones((2, 4, 1), dtype="float32")
    with pytest.raises(NonFiniteError, match="float16"):
        jacstream.jacobian(lambda v: 1e5 * v, x, tmp_path / "j.zarr", dtype="float16",
                           progress=False)
    J = jacstream.jacobian(lambda v: 1e5 * v, x, tmp_path / "k.zarr", dtype="bfloat16",
                           progress=False)
    assert float(J[0, 1, 0, 1, 0]) == pytest.approx(1e5, rel=2.0**-8)


# --------------------------------------------------------------------------- devices
@pytest.mark.parametrize("name", ["cpu", "CPU", "CPU:0", "cpu:0", "/device:CPU:0",
                                  "/job:localhost/replica:0/task:0/device:CPU:0"])
def test_cpu_device_names_resolve(name):
    from jacstream.engine import devices as _tf

    assert _tf.resolve_device(name).endswith("device:CPU:0")


def test_missing_devices_raise_device_error():
    import tensorflow as tf

    from jacstream.engine import devices as _tf

    bad = ["tpu", "cpu:7", "potato"] + ([] if tf.config.list_logical_devices("GPU") else
                                        ["gpu", "GPU:0", "/device:GPU:0"])
    for name in bad:
        with pytest.raises(DeviceError, match="does not exist here"):
            _tf.resolve_device(name)
    with pytest.raises(DeviceError, match="string"):
        _tf.resolve_device(0)
    with pytest.raises(ValueError, match="does not exist here"):   # the builtin a caller catches
        _tf.resolve_device("cpu:7")


def test_memory_probe_measures_the_device_it_runs_on():
    """The tracker a probe uses is entered and sees memory taken on its device."""
    import tensorflow as tf

    from jacstream.engine import devices

    with devices.peak_tracker(devices.resolve_device("cpu")) as t:
        buf = np.ones(64 * 2**20 // 8)   # 64 MiB, touched
        del buf
    assert t.increase >= 48 * 2**20
    if not tf.config.list_logical_devices("GPU"):
        return
    gpu = devices.resolve_device("gpu")
    with devices.peak_tracker(gpu) as t:
        with tf.device(gpu):
            a = tf.ones((64 * 2**20 // 4,))
            del a
    assert 48 * 2**20 <= t.increase


@pytest.fixture(scope="module")
def rnn_zoo():
    import keras

    keras.utils.set_random_seed(11)
    L = keras.layers
    inp = keras.Input((None, 2))
    h = L.LSTM(5, return_sequences=True)(inp)
    h = L.Bidirectional(L.GRU(3, return_sequences=True))(h)
    return keras.Model(inp, L.TimeDistributed(L.Dense(2))(h))


def test_cudnn_rewrite_runs_on_cpu_with_equal_outputs(rnn_zoo):
    from jacstream.engine import devices, models

    x = np.random.default_rng(12).normal(size=(2, 9, 2)).astype("float32")
    prepared = models.prepare_model(rnn_zoo, x, devices.resolve_device("cpu"), no_cudnn=True)
    assert sum("no cuDNN" in r for r in prepared.rewritten) == 2   # LSTM, Bidirectional(GRU)
    rnns = [sub for layer in prepared.call.layers
            for sub in layer._flatten_layers(include_self=True, recursive=True)
            if hasattr(sub, "use_cudnn")]
    assert len(rnns) == 3 and all(r.use_cudnn is False for r in rnns)
    # the caller's model is untouched
    assert all(sub.use_cudnn == "auto" for layer in rnn_zoo.layers
               for sub in layer._flatten_layers(include_self=True, recursive=True)
               if hasattr(sub, "use_cudnn"))
    # The same function through other kernels: equal to float32 rounding (an AVX2-only EPYC
    # differs in the last bit, shared/NOTES.md "Machines differ").
    assert_jacobian_close(prepared.call(x), rnn_zoo(x), "cuDNN-free copy vs original")
    # by default (on the CPU) only the TimeDistributed head is rewritten
    default = models.prepare_model(rnn_zoo, x, devices.resolve_device("cpu"))
    assert not any("no cuDNN" in r for r in default.rewritten)


def test_masked_model_with_a_pointwise_head_is_exact_and_silent(tmp_path):
    # Masking -> LSTM -> TimeDistributed(Dense): jacstream's own pointwise head (the
    # TimeDistributed rewrite) passes the mask on, so Keras has nothing to warn about.
    import warnings

    import keras

    keras.utils.set_random_seed(21)
    inp = keras.Input((10, 1))
    h = keras.layers.LSTM(4, return_sequences=True)(keras.layers.Masking(0.0)(inp))
    model = keras.Model(inp, keras.layers.TimeDistributed(keras.layers.Dense(2))(h))
    x = np.random.default_rng(21).normal(size=(2, 10, 1)).astype("float32")
    x[1, 6:] = 0.0    # a padded tail: masked steps
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="tile", progress=False)
    assert [str(w.message) for w in seen] == []
    # (Keras numbers the layer's name by what the process built before)
    assert [r.split("(")[0] for r in J.attrs["model_rewrites"]] == ["TimeDistributed"]
    assert_jacobian_close(J[...], reference_jacobian(model, x), "masked, pointwise head")


def test_jacobian_on_named_cpu_device(rnn_zoo, tmp_path):
    x = np.random.default_rng(13).normal(size=(2, 9, 2)).astype("float32")
    J = jacstream.jacobian(rnn_zoo, x, tmp_path / "j.zarr", device="/device:CPU:0",
                           strategy="tile", progress=False)
    assert J.attrs["device"].endswith("CPU:0") and J.attrs["runs"][-1]["device"].endswith("CPU:0")
    assert_jacobian_close(J[...], reference_jacobian(rnn_zoo, x), "device=/device:CPU:0")


@pytest.mark.gpu
def test_gpu_result_matches_cpu(rnn_zoo, tmp_path):
    import tensorflow as tf

    if not tf.config.list_logical_devices("GPU"):
        pytest.skip("no GPU visible to TensorFlow")
    x = np.random.default_rng(14).normal(size=(2, 30, 2)).astype("float32")
    cpu = jacstream.jacobian(rnn_zoo, x, tmp_path / "c.zarr", device="cpu", progress=False)
    for strategy in ("pfor", "tile", "forward"):
        gpu = jacstream.jacobian(rnn_zoo, x, tmp_path / f"{strategy}.zarr", device="gpu",
                                 strategy=strategy, progress=False)
        assert ":GPU:" in gpu.attrs["device"]
        assert any("no cuDNN" in r for r in gpu.attrs["model_rewrites"])
        assert_jacobian_close(gpu[...], cpu[...], f"GPU {strategy} vs CPU")
