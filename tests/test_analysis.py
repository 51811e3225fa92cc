"""Analysis functions against the same computation in NumPy on the full array.

One table of sources (NumPy, dask, xarray, jacstream stores: causal, with a
subset of output steps) runs through one table of analyses, each compared with
a NumPy reference on the dense array; slabs are forced down to single rows in
one variant, so that windows and bins straddle slab boundaries. Then: the
issue's window sum on a real LSTM Jacobian, bounded memory on a store larger
than the memory the analysis may use, and streaming reductions against the
reduction of the stored full result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_jacobian_close

import jacstream
from jacstream import analysis
from jacstream.analysis import source as _reduce
from jacstream.analysis.reductions import as_reduction
from jacstream.errors import InputError, StoreMismatchError
from jacstream.planning import make_plan
from jacstream.store import JobStore

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RTOL = 1e-9   # the analyses sum in float64, as the references do


# --------------------------------------------------------------------------- sources
def write_store(path: Path, J: np.ndarray, *, out_steps=None, causal=False, block_size=3,
                examples_per_block=2) -> jacstream.Jacobian:
    """A jacstream store holding ``J``, written block by block as the engine writes it."""
    batch, n_out, f_out, t_in, f_in = J.shape
    out_steps = None if out_steps is None else [int(s) for s in out_steps]
    t_out = t_in if out_steps is None else max(max(out_steps) + 1, t_in if causal else 0)
    plan = make_plan((batch, t_in, f_in), (batch, t_out, f_out),
                     out_steps=out_steps if out_steps is not None else list(range(n_out)),
                     block_size=block_size, examples_per_block=examples_per_block,
                     causal=causal)
    job = {"model": "synthetic", "inputs": "synthetic", "input_shape": [batch, t_in, f_in],
           "output_shape": [batch, t_out, f_out], "out_steps": list(plan.out_steps),
           "causal": causal, "dtype": "float32",
           "layout": ["example", "out_step", "out_feature", "in_step", "in_feature"]}
    store = JobStore.create(path, plan, job)
    for block in plan.blocks:
        (e0, e1), (p0, p1) = block.examples, block.positions
        store.write_block(plan, block, J[e0:e1, p0:p1, :, :block.in_len], durable=False)
    return jacstream.Jacobian(JobStore.open(path))


def dense(kind: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(J as float32 NumPy, output step numbers, causal) for a source kind."""
    rng = np.random.default_rng(zlib.crc32(kind.encode()))   # hash() changes per process
    if kind == "causal":
        t = np.arange(11)
        J = rng.normal(size=(3, 11, 2, 11, 2))
        J *= (t[:, None] >= t[None, :])[None, :, None, :, None]
        return J.astype(np.float32), t, True
    if kind == "subset":
        steps = np.array([1, 3, 4, 8, 9])
        return rng.normal(size=(3, 5, 2, 10, 2)).astype(np.float32), steps, False
    J = rng.normal(size=(3, 7, 2, 9, 2)).astype(np.float32)
    J[1, 2, 1, 4, 0] = 0.0          # a few exact zeros and ties for top_k
    J[2, :, :, 5:7] = 0.0
    return J, np.arange(7), False


def source(kind: str, tmp_path: Path):
    """The object handed to the analysis functions for a source kind."""
    if kind in ("numpy", "dask", "zarr"):
        J, _, _ = dense("numpy")
        if kind == "numpy":
            return J
        if kind == "dask":
            import dask.array as da

            return da.from_array(J, chunks=(2, 3, 2, 4, 2))
        import zarr

        z = zarr.create_array(str(tmp_path / "raw.zarr"), shape=J.shape, dtype="f4",
                              chunks=(2, 2, 2, 9, 2))
        z[...] = J
        return z
    if kind == "xarray":
        J, steps, _ = dense("subset")
        return write_store(tmp_path / "x.zarr", J, out_steps=list(steps)).to_xarray()
    J, steps, causal = dense(kind)
    return write_store(tmp_path / "s.zarr", J, out_steps=list(steps), causal=causal)


def base_kind(kind: str) -> str:
    return {"dask": "numpy", "zarr": "numpy", "xarray": "subset"}.get(kind, kind)


# --------------------------------------------------------------------------- references
def ref_window_sum(J, steps, causal, in_steps=None, out_steps=None, absolute=False,
                   example=None):
    A = np.abs(J.astype(np.float64)) if absolute else J.astype(np.float64)
    if example is not None:
        A = A[example:example + 1]
    for axis, spec in ((3, in_steps), (1, out_steps)):
        if isinstance(spec, slice):
            A = A[(slice(None),) * axis + (spec,)].sum(axis=axis, keepdims=True)
        elif isinstance(spec, int):
            starts = np.arange(0, A.shape[axis], spec)
            A = np.add.reduceat(A, starts, axis=axis)
    drop = tuple(a for a, s in ((1, out_steps), (3, in_steps)) if isinstance(s, slice))
    A = A.squeeze(axis=drop) if drop else A
    return A[0] if example is not None else A


def ref_influence_map(J, steps, causal, reduce="sum", absolute=True, example=None, bins=None):
    A = np.abs(J.astype(np.float64)) if absolute else J.astype(np.float64)
    A = A.sum(axis=(2, 4)) if reduce == "sum" else A.max(axis=(2, 4))    # (batch, n_out, T)
    if bins is not None:
        bo, bi = bins if isinstance(bins, tuple) else (bins, bins)
        red = np.add if reduce == "sum" else np.maximum
        A = red.reduceat(red.reduceat(A, np.arange(0, A.shape[1], bo), axis=1),
                         np.arange(0, A.shape[2], bi), axis=2)
    return A[example] if example is not None else A.mean(axis=0)


def ref_lag_profile(J, steps, causal, absolute=True):
    A = np.abs(J.astype(np.float64)) if absolute else J.astype(np.float64)
    lag = steps[:, None] - np.arange(J.shape[3])[None, :]        # (n_out, T_in)
    lags = np.unique(lag)
    if causal:
        lags = lags[lags >= 0]
    per = np.array([[A[i].transpose(0, 2, 1, 3)[lag == L].mean() for L in lags]
                    for i in range(J.shape[0])])
    return lags, per


def ref_top_k(J, steps, causal, k=5, example=None):
    A = np.abs(J.astype(np.float64))
    score = A[example] if example is not None else A.mean(axis=0)   # (n_out, F1, T, F2)
    flat = score.reshape(score.shape[0], score.shape[1], -1)
    idx = np.argsort(-flat, axis=2, kind="stable")[:, :, :k]
    return idx // J.shape[4], idx % J.shape[4], np.take_along_axis(flat, idx, axis=2)


def ref_feature_importance(J, steps, causal, absolute=True, example=None):
    A = np.abs(J.astype(np.float64)) if absolute else J.astype(np.float64)
    if example is not None:
        A = A[example:example + 1]
    return A.mean(axis=(0, 1, 3))


# --------------------------------------------------------------------------- the table
CASES = [
    ("window_sum", {"in_steps": slice(0, 4)}),                 # reduce_sum(J[..., :4, :], 3)
    ("window_sum", {"in_steps": slice(3, 8), "absolute": True}),
    ("window_sum", {"out_steps": slice(1, 4)}),
    ("window_sum", {"in_steps": slice(2, None), "out_steps": slice(0, 2), "example": 1}),
    ("window_sum", {"in_steps": 4}),                           # consecutive windows
    ("window_sum", {"out_steps": 2, "in_steps": 3, "absolute": True}),
    ("influence_map", {}),
    ("influence_map", {"reduce": "max"}),
    ("influence_map", {"reduce": "max", "absolute": False}),
    ("influence_map", {"example": 2, "absolute": False}),
    ("influence_map", {"reduce": "max", "bins": (2, 3)}),
    ("influence_map", {"reduce": "max", "absolute": False, "bins": 4, "example": 0}),
    ("influence_map", {"bins": (3, 2)}),
    ("lag_profile", {}),
    ("lag_profile", {"absolute": False}),
    ("top_k", {"k": 3}),
    ("top_k", {"k": 4, "example": 2}),
    ("feature_importance", {}),
    ("feature_importance", {"absolute": False, "example": 0}),
]
SOURCES = ["numpy", "dask", "zarr", "causal", "subset", "xarray"]


def check(name, kwargs, got, J, steps, causal):
    """Compare one analysis result with its NumPy reference."""
    if name == "lag_profile":
        lags, per = ref_lag_profile(J, steps, causal, **kwargs)
        np.testing.assert_array_equal(got["lag"].values, lags)
        np.testing.assert_allclose(got["per_example"].values, per, rtol=RTOL, atol=1e-12)
        np.testing.assert_allclose(got["mean"].values, per.mean(axis=0), rtol=RTOL, atol=1e-12)
        np.testing.assert_allclose(got["std"].values, per.std(axis=0), rtol=RTOL, atol=1e-12)
        return
    if name == "top_k":
        step, feat, val = ref_top_k(J, steps, causal, **kwargs)
        np.testing.assert_allclose(got["value"].values, val, rtol=RTOL, atol=1e-12)
        np.testing.assert_array_equal(got["in_step"].values, step)
        np.testing.assert_array_equal(got["in_feature"].values, feat)
        np.testing.assert_array_equal(got["out_step"].values, steps)
        return
    ref = globals()[f"ref_{name}"](J, steps, causal, **kwargs)
    assert got.shape == ref.shape, (got.dims, ref.shape)
    np.testing.assert_allclose(got.values, ref, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("slab", ["default", "one_row"])
@pytest.mark.parametrize("kind", SOURCES)
def test_analyses_match_numpy(kind, slab, tmp_path, monkeypatch):
    if slab == "one_row":   # slabs of one (example, output step): windows straddle slabs
        monkeypatch.setattr(_reduce, "SLAB_BYTES", 1)
    J, steps, causal = dense(base_kind(kind))
    src = source(kind, tmp_path)
    for name, kwargs in CASES:
        got = getattr(analysis, name)(src, **kwargs)
        try:
            check(name, kwargs, got, J, steps, causal)
        except AssertionError as e:
            raise AssertionError(f"{name}({kwargs}) on {kind} ({slab} slabs): {e}") from None


def test_results_carry_real_step_numbers(tmp_path):
    J, steps, _ = dense("subset")
    res = write_store(tmp_path / "s.zarr", J, out_steps=list(steps))
    m = analysis.influence_map(res, example=0)
    assert m.dims == ("out_step", "in_step")
    np.testing.assert_array_equal(m.out_step.values, steps)
    np.testing.assert_array_equal(m.in_step.values, np.arange(10))
    # the lags use the real output step numbers: t1 - t2 from 1 - 9 to 9 - 0
    assert analysis.lag_profile(res).lag.values.tolist() == list(range(-8, 10))
    w = analysis.window_sum(res, out_steps=slice(1, 3), in_steps=5)
    assert w.attrs["out_window"] == [3, 4]
    assert w.in_window.values.tolist() == [0, 5] and w.in_window_last.values.tolist() == [4, 9]


def test_causal_store_reads_only_the_lower_triangle(tmp_path, monkeypatch):
    J, steps, _ = dense("causal")
    res = write_store(tmp_path / "c.zarr", J, causal=True, block_size=3)
    widths = []
    read = _reduce.Source.read

    def spy(self, e, p, t):
        widths.append((p, t))
        return read(self, e, p, t)

    monkeypatch.setattr(_reduce.Source, "read", spy)
    analysis.lag_profile(res)
    assert widths and all(t[1] == min(11, steps[p[1] - 1] + 1) for p, t in widths)
    assert analysis.lag_profile(res).lag.values.min() == 0


def test_open_reduced_refuses_a_full_store(tmp_path):
    J, steps, causal = dense("causal")
    write_store(tmp_path / "full.zarr", J, causal=True)
    with pytest.raises(jacstream.errors.NotAStoreError, match="jacstream.open"):
        analysis.open_reduced(tmp_path / "full.zarr")
    with pytest.raises(jacstream.errors.NotAStoreError):
        analysis.open_reduced(tmp_path / "missing.zarr")


def test_bad_arguments_say_what_is_expected(tmp_path):
    J, _, _ = dense("numpy")
    with pytest.raises(InputError, match="in_steps or out_steps"):
        analysis.window_sum(J)
    with pytest.raises(InputError, match="contiguous"):
        analysis.window_sum(J, in_steps=slice(0, 6, 2))
    with pytest.raises(InputError, match="selects no step"):
        analysis.window_sum(J, in_steps=slice(5, 5))
    with pytest.raises(InputError, match="'sum', 'max'"):
        analysis.influence_map(J, reduce="mean")
    with pytest.raises(InputError, match="out of range"):
        analysis.top_k(J, example=3)
    with pytest.raises(InputError, match=r"k must be an int in 1\.\.18"):
        analysis.top_k(J, k=19)
    with pytest.raises(InputError, match="rank 4"):
        analysis.lag_profile(J[0])
    with pytest.raises(InputError, match="is not a reduction"):
        analysis.reduction("mean")
    with pytest.raises(InputError, match="takes no argument 'bins'"):
        analysis.reduction("top_k", bins=3)


# --------------------------------------------------------------------------- dask / xarray views
def test_to_dask_is_aligned_with_the_store_and_exact(tmp_path):
    J, steps, _ = dense("causal")
    res = write_store(tmp_path / "c.zarr", J, causal=True, block_size=3, examples_per_block=2)
    d = res.to_dask()
    assert d.chunksize == res.array.chunks
    assert all(c == res.array.chunks[i] for i, cs in enumerate(d.chunks) for c in cs[:-1])
    np.testing.assert_array_equal(d.compute(), J)   # the stored values read back
    # the issue's window sum, lazily: dask's sum is another op order than NumPy's
    assert_jacobian_close(d[:, :, :, :4].sum(axis=3).compute(), J[:, :, :, :4].sum(axis=3),
                          "dask window sum")


def test_to_xarray_has_named_dims_and_real_steps(tmp_path):
    J, steps, _ = dense("subset")
    res = write_store(tmp_path / "s.zarr", J, out_steps=list(steps))
    x = res.to_xarray()
    assert x.dims == ("example", "out_step", "out_feature", "in_step", "in_feature")
    np.testing.assert_array_equal(x.out_step.values, steps)
    np.testing.assert_array_equal(x.in_step.values, np.arange(10))
    np.testing.assert_array_equal(x.sel(out_step=8).values, J[:, 3])   # stored values read back
    assert x.chunks is not None   # lazy
    assert_jacobian_close(x.sel(in_step=slice(0, 3)).sum("in_step").values,
                          J[:, :, :, :4].sum(axis=3), "xarray window sum")


# --------------------------------------------------------------------------- a real model
# Tiling traces several times faster than pfor and the model is known to be causal:
# each call below then takes about a second on two cores.
FAST = {"strategy": "tile", "causal": True}


@pytest.fixture(scope="module")
def lstm(tmp_path_factory):
    """(model, x, stored Jacobian, batch_jacobian reference) for a tiny causal LSTM."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((None, 2)), keras.layers.LSTM(6, return_sequences=True),
                              keras.layers.Dense(2)])
    x = np.random.default_rng(1).normal(size=(3, 24, 2)).astype("float32")
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model(xt)
    ref = tape.batch_jacobian(y, xt)
    res = jacstream.jacobian(model, x, tmp_path_factory.mktemp("lstm") / "j.zarr",
                             block_size=5, examples_per_block=2, progress=False, **FAST)
    return model, x, res, ref


def test_issue_window_sum_on_lstm_matches_tensorflow(lstm):
    import tensorflow as tf

    _, _, res, ref = lstm
    want = tf.reduce_sum(ref[:, :, :, :10], axis=3).numpy()
    got = analysis.window_sum(res, in_steps=slice(None, 10))
    assert res.causal
    assert_jacobian_close(got.values, want, "window sum vs batch_jacobian")


# One case per accumulator (and its awkward options); blocks of 5 output steps x 2
# examples, so windows, bins and the examples of top_k span several blocks.
REDUCE_CASES = [
    "lag_profile",
    analysis.reduction("window_sum", out_steps=4, in_steps=slice(5, 20), absolute=True),
    analysis.reduction("influence_map", reduce="max", absolute=False, example=1),
    analysis.reduction("influence_map", reduce="max", bins=5),
    analysis.reduction("top_k", k=4),
]


@pytest.mark.parametrize("spec", REDUCE_CASES, ids=lambda s: s if isinstance(s, str) else
                         f"{s.name}-{'-'.join(f'{k}={v}' for k, v in s.kwargs.items())}")
def test_streaming_reduction_matches_reduction_of_stored_result(lstm, spec, tmp_path):
    import xarray as xr

    model, x, res, _ = lstm
    r = as_reduction(spec)
    path = None if spec == "lag_profile" else tmp_path / "reduced.zarr"   # None: memory only
    got = jacstream.jacobian(model, x, path, block_size=5, examples_per_block=2,
                             progress=False, **FAST, reduce=spec)
    want = getattr(analysis, r.name)(res, **r.kwargs)
    assert type(got) is type(want)
    # the same blocks, reduced in the same order: equal to float64 rounding
    xr.testing.assert_allclose(got.drop_attrs(), want.drop_attrs(), rtol=1e-10, atol=0)
    assert json.loads(got.attrs["jacstream"])["reduction"]["name"] == r.name
    if path is not None:   # only the reduced result is on disk, and it reads back as returned
        assert not (path / "jacobian").exists()
        xr.testing.assert_identical(analysis.open_reduced(path), got)
        with pytest.raises(jacstream.errors.NotAStoreError, match="open_reduced"):
            jacstream.open(path)   # the other way round: named, with the right opener


def test_streaming_reduction_reuses_saved_result_and_checks_the_job(lstm, tmp_path):
    model, x, res, _ = lstm
    path = tmp_path / "lags.zarr"
    first = jacstream.jacobian(model, x, path, block_size=5, progress=False, **FAST,
                               reduce="feature_importance")
    # another plan: float32 rounding differs
    assert_jacobian_close(first.values, analysis.feature_importance(res).values,
                          "streamed feature_importance, another plan")
    blocks = []
    again = jacstream.jacobian(model, x, path, block_size=5, progress=False, **FAST,
                               reduce="feature_importance", on_block=blocks.append)
    assert blocks == []   # loaded, not recomputed
    assert again.identical(first)
    with pytest.raises(StoreMismatchError, match="reduction"):
        jacstream.jacobian(model, x, path, block_size=5, progress=False, **FAST, reduce="top_k")
    other = jacstream.jacobian(model, x, path, block_size=5, progress=False, **FAST,
                               reduce="top_k", overwrite=True, on_block=blocks.append)
    assert len(blocks) == 5
    assert analysis.open_reduced(path).identical(other)


def test_streaming_reduction_rejects_bad_specs_and_other_stores(lstm, tmp_path):
    model, x, res, _ = lstm
    with pytest.raises(InputError, match="is not a reduction"):
        jacstream.jacobian(model, x, tmp_path / "r.zarr", reduce="median")
    res_path = res.path
    with pytest.raises(StoreMismatchError, match="already exists"):   # a full store
        jacstream.jacobian(model, x, res_path, block_size=5, progress=False, **FAST,
                           reduce="lag_profile")
    assert jacstream.open(res_path).complete
    with pytest.raises(InputError, match="multiple of 4"):
        jacstream.jacobian(model, x, tmp_path / "r.zarr", block_size=5, progress=False, **FAST,
                           reduce=analysis.reduction("influence_map", reduce="max", bins=4))
    assert not (tmp_path / "r.zarr").exists()


# --------------------------------------------------------------------------- bounded memory
BOUNDED = textwrap.dedent("""
    import json, sys
    import numpy as np
    from jacstream import analysis, open as jopen, plot
    from jacstream._memory import PeakTracker

    import matplotlib.backends.backend_agg, matplotlib.figure, xarray  # imports are not data

    res = jopen(sys.argv[1])
    out = {"dense": res.nbytes}
    with PeakTracker() as t:
        prof = analysis.lag_profile(res)
        top = analysis.top_k(res, k=3)
        win = analysis.window_sum(res, in_steps=slice(0, 10))
        imp = analysis.feature_importance(res)
        fig = plot.heatmap(res, max_pixels=200)
    out["increase"] = t.increase
    out["mean"] = prof["mean"].values[:5].tolist()
    out["top"] = top.in_step.values[-1, 0].tolist()
    out["win"] = float(win.values[1, 12, 0, 0])
    out["imp"] = float(imp.values[0, 0])
    print(json.dumps(out))
""")


def test_analysis_memory_stays_bounded_on_a_store_larger_than_allowed(tmp_path):
    # J[i, t1, 0, t2, 0] = (i + 1) * 0.5 ** (t1 - t2) for t2 <= t1: a causal store of
    # 4 x 4200 x 4200 float32 = 282 MB dense, written block by block as the engine does.
    batch, T = 4, 4200
    plan = make_plan((batch, T, 1), (batch, T, 1), block_size=100, causal=True)
    job = {"model": "synthetic", "inputs": "synthetic", "input_shape": [batch, T, 1],
           "output_shape": [batch, T, 1], "out_steps": list(range(T)), "causal": True,
           "dtype": "float32",
           "layout": ["example", "out_step", "out_feature", "in_step", "in_feature"]}
    path = tmp_path / "big.zarr"
    store = JobStore.create(path, plan, job)
    scale = np.arange(1, batch + 1, dtype=np.float32)[:, None, None, None, None]
    for block in plan.blocks:
        p0, p1 = block.positions
        lag = np.arange(p0, p1)[:, None] - np.arange(block.in_len)[None, :]
        tile = np.where(lag >= 0, 0.5 ** np.maximum(lag, 0), 0).astype(np.float32)
        store.write_block(plan, block, scale * tile[None, :, None, :, None], durable=False)
    del store

    run = subprocess.run([sys.executable, "-c", BOUNDED, str(path)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(Path(jacstream.__file__).parents[1]),
                              os.environ.get("PYTHONPATH", "")])})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["dense"] == batch * T * T * 4
    # Everything read: means at lag L are 2.5 * 0.5 ** L (the mean of i + 1 over 4 examples)
    np.testing.assert_allclose(out["mean"], [2.5 * 0.5 ** L for L in range(5)], rtol=1e-6)
    assert out["top"] == [T - 1, T - 2, T - 3]
    np.testing.assert_allclose(out["win"], 2 * sum(0.5 ** (12 - t) for t in range(10)),
                               rtol=1e-6)
    assert out["imp"] > 0
    # Bounded: well below the dense size (slabs of 32 MiB at most, a few copies of one).
    assert out["increase"] < out["dense"] / 4, out
