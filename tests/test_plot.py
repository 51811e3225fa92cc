"""Plots: the pixels drawn are the values (or block maxima) computed in NumPy.

Set JACSTREAM_TEST_PLOTS=<dir> to keep the PNGs for a look.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from jacstream import analysis, plot
from jacstream.errors import InputError


@pytest.fixture
def out_dir(tmp_path) -> Path:
    d = Path(os.environ.get("JACSTREAM_TEST_PLOTS", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


def decaying(T: int, batch: int = 2, f_out: int = 1, f_in: int = 1, causal: bool = True,
             seed: int = 0) -> np.ndarray:
    """J[i, t1, f1, t2, f2] ~ r ** (t1 - t2) with noise; zero above the diagonal if causal."""
    rng = np.random.default_rng(seed)
    t = np.arange(T)
    lag = t[:, None] - t[None, :]
    J = np.empty((batch, T, f_out, T, f_in), np.float32)
    for i in range(batch):
        base = (0.9 + 0.05 * i) ** np.abs(lag)
        if causal:
            base = np.where(lag >= 0, base, 0.0)
        noise = 1 + 0.1 * rng.standard_normal((T, f_out, T, f_in))
        J[i] = base[:, None, :, None] * noise * np.where(rng.random((1, f_out, 1, f_in)) < 0.5,
                                                         -1, 1)
    return J


def image_of(fig) -> np.ma.MaskedArray:
    (ax,) = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    (img,) = ax.images
    return np.ma.asarray(img.get_array())


def test_heatmap_draws_the_selected_slice(out_dir):
    J = decaying(30, batch=3, f_out=2, f_in=3)
    fig = plot.heatmap(J, example=2, out_feature=1, in_feature=2, path=out_dir / "small.png")
    np.testing.assert_allclose(image_of(fig), np.abs(J[2, :, 1, :, 2]), rtol=1e-6)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "input step t2" and ax.get_ylabel() == "output step t1"
    assert "example 2" in ax.get_title() and "∂y[t1, 1] / ∂x[t2, 2]" in ax.get_title()
    assert ax.get_xlim() == (-0.5, 29.5) and ax.get_ylim() == (-0.5, 29.5)
    assert (out_dir / "small.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("T, max_pixels", [(1000, 100), (1001, 100), (600, 1000)])
def test_heatmap_aggregates_large_maps_by_block_max(T, max_pixels, out_dir):
    J = decaying(T, batch=1, seed=T)
    fig = plot.heatmap(J, max_pixels=max_pixels, log=True, path=out_dir / f"big{T}.png")
    img = image_of(fig)
    b = -(-T // max_pixels)
    assert img.shape == (-(-T // b),) * 2 and max(img.shape) <= max_pixels
    A = np.abs(J[0, :, 0, :, 0]).astype(np.float64)
    starts = np.arange(0, T, b)
    want = np.maximum.reduceat(np.maximum.reduceat(A, starts, axis=0), starts, axis=1)
    np.testing.assert_allclose(img.filled(0.0), want, rtol=1e-6)
    # log scale: the exact zeros of the upper triangle are masked (drawn grey), not -inf
    assert img.mask[0, -1] and not img.mask[-1, 0]
    assert (f"blocks of {b} x {b} steps" in fig.axes[0].get_title()) == (b > 1)


def test_heatmap_signed_keeps_the_sign_of_the_largest_entry(out_dir):
    J = decaying(40, batch=1, causal=False)
    J[0, 3, 0, 5, 0] = -50.0
    fig = plot.heatmap(J, absolute=False, max_pixels=20, path=out_dir / "signed.png")
    img = image_of(fig)
    blocks = J[0, :, 0, :, 0].reshape(20, 2, 20, 2).transpose(0, 2, 1, 3).reshape(20, 20, 4)
    want = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], 2)[..., 0]
    np.testing.assert_allclose(img, want, rtol=1e-6)
    assert img[1, 2] == -50.0
    norm = fig.axes[0].images[0].norm
    assert norm.vmin == -norm.vmax == -50.0


def test_heatmap_uses_real_output_step_numbers(out_dir):
    import xarray as xr

    J = decaying(20, batch=1)[:, 10:15]                 # output steps 10..14 only
    da = xr.DataArray(J, dims=("example", "out_step", "out_feature", "in_step", "in_feature"),
                      coords={"out_step": np.arange(10, 15)})
    fig = plot.heatmap(da, path=out_dir / "subset.png")
    assert fig.axes[0].get_ylim() == (9.5, 14.5)


def test_heatmap_rejects_bad_arguments():
    J = decaying(10, batch=1)
    with pytest.raises(InputError, match="max_pixels"):
        plot.heatmap(J, max_pixels=0)
    with pytest.raises(InputError, match="out_feature"):
        plot.heatmap(J, out_feature=1)
    with pytest.raises(InputError, match="out of range"):
        plot.heatmap(J, example=5)


def test_lag_profile_plot_draws_the_profile(out_dir):
    J = decaying(200, batch=3)
    prof = analysis.lag_profile(J)
    fig = plot.lag_profile(J, path=out_dir / "lags.png")
    ax = fig.axes[0]
    (mean_line,) = [ln for ln in ax.lines if ln.get_label() == "mean over examples"]
    lags = np.asarray(mean_line.get_xdata())
    assert lags[0] == 0 and lags[-1] == 199     # a causal profile: lags >= 0 only
    np.testing.assert_allclose(np.ma.asarray(mean_line.get_ydata()),
                               prof["mean"].sel(lag=lags).values, rtol=1e-12)
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel().startswith("lag t1 - t2")
    assert "How far back" in ax.get_title()
    # the marked reach: the smallest lag holding 90% of the total |J| at lags >= 0
    mass = (prof["mean"] * prof["count"]).values
    reach = int(prof.lag[np.searchsorted(np.cumsum(mass) / mass.sum(), 0.9)])
    (vline,) = [ln for ln in ax.lines if ln.get_label().startswith("90%")]
    assert vline.get_xdata()[0] == reach and f"lag ≤ {reach}" in vline.get_label()
    assert sum(ln.get_color() == "0.6" for ln in ax.lines) == 3     # one line per example
    assert (out_dir / "lags.png").stat().st_size > 10_000


def test_lag_profile_plot_takes_a_computed_profile_and_linear_axes(out_dir):
    J = decaying(50, batch=2, causal=False)
    prof = analysis.lag_profile(J)
    fig = plot.lag_profile(prof, log=False, max_lag=20, path=out_dir / "lags_lin.png")
    ax = fig.axes[0]
    (mean_line,) = [ln for ln in ax.lines if ln.get_label() == "mean over examples"]
    assert mean_line.get_xdata()[0] == -49 and mean_line.get_xdata()[-1] == 20
    assert ax.get_yscale() == "linear"
    (vline,) = [ln for ln in ax.lines if ln.get_label().startswith("90%")]
    assert "at lags ≥ 0" in vline.get_label()
    with pytest.raises(InputError, match="share"):
        plot.lag_profile(prof, share=1.5)
    with pytest.raises(InputError, match="no lag to draw"):
        plot.lag_profile(prof, max_lag=-60)


def test_plots_leave_no_pyplot_figures_open():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot.heatmap(decaying(10, batch=1))
    plot.lag_profile(decaying(10, batch=1))
    assert plt.get_fignums() == before


# --------------------------------------------------------------------------- zoom
def test_heatmap_zooms_on_a_window_of_steps(out_dir):
    J = decaying(60, batch=2, f_in=2)
    fig = plot.heatmap(J, example=1, in_feature=1, out_steps=slice(20, 35),
                       in_steps=slice(10, 30), path=out_dir / "zoom.png")
    np.testing.assert_allclose(image_of(fig), np.abs(J[1, 20:35, 0, 10:30, 1]), rtol=1e-6)
    ax = fig.axes[0]
    assert ax.get_xlim() == (9.5, 29.5) and ax.get_ylim() == (19.5, 34.5)
    assert "output steps 20..34, input steps 10..29" in ax.get_title()
    # windows larger than max_pixels are aggregated within the window
    fig = plot.heatmap(J, out_steps=slice(10, 50), in_steps=slice(0, 40), max_pixels=10)
    A = np.abs(J[0, 10:50, 0, 0:40, 0]).astype(np.float64)
    s = np.arange(0, 40, 4)
    want = np.maximum.reduceat(np.maximum.reduceat(A, s, axis=0), s, axis=1)
    np.testing.assert_allclose(image_of(fig), want, rtol=1e-6)


def test_heatmap_by_lag_shows_the_band_along_the_diagonal(out_dir):
    T, L = 40, 6
    J = decaying(T, batch=1)
    J[0, 2, 0, 0, 0] = 0.0       # an exact zero inside the band: grey on a log scale
    fig = plot.heatmap(J, max_lag=L, log=True, path=out_dir / "lags_map.png")
    ax = fig.axes[0]
    img, white = ax.images
    want = np.full((T, L + 1), np.nan)
    for t1 in range(T):
        for lag in range(min(L, t1) + 1):
            want[t1, lag] = abs(J[0, t1, 0, t1 - lag, 0])
    got = np.ma.asarray(img.get_array())
    np.testing.assert_allclose(got.filled(np.nan), np.where(want > 0, want, np.nan), rtol=1e-6)
    assert got.mask[2, 2] and got[3, 3] > 0            # the zero at (2, lag 2) is grey
    # cells with no input step (t1 - lag < 0) are white, and only those
    assert np.array_equal(~np.ma.getmaskarray(white.get_array()), np.isnan(want))
    assert ax.get_xlabel() == "lag t1 - t2" and ax.get_xlim() == (-0.5, L + 0.5)
    assert "lags 0..6" in ax.get_title() and "grey: exactly 0" in fig.axes[1].get_ylabel()
    # with a window of output steps, and signed
    fig = plot.heatmap(J, out_steps=slice(30, None), max_lag=L, absolute=False)
    np.testing.assert_allclose(image_of_first(fig), want[30:] * np.sign(
        [[J[0, t1, 0, t1 - lag, 0] for lag in range(L + 1)] for t1 in range(30, T)]), rtol=1e-6)


def image_of_first(fig) -> np.ndarray:
    return np.ma.asarray(fig.axes[0].images[0].get_array()).filled(np.nan)


def test_zoom_rejects_bad_windows():
    J = decaying(20, batch=1)
    with pytest.raises(InputError, match="selects no output step"):
        plot.heatmap(J, out_steps=slice(30, 40))
    with pytest.raises(InputError, match="selects no input step"):
        plot.heatmap(J, in_steps=slice(5, 5))
    with pytest.raises(InputError, match="pass one of them"):
        plot.heatmap(J, in_steps=slice(0, 5), max_lag=3)
    with pytest.raises(InputError, match="max_lag must be an int >= 0"):
        plot.heatmap(J, max_lag=-1)


def _corrupt_chunks_outside(store: Path, keep) -> int:
    """Overwrite every stored chunk of the Jacobian whose (out, in) chunk indices ``keep``
    rejects with bytes zarr cannot decode; the number of chunks corrupted."""
    n = 0
    for f in (store / "jacobian" / "c").rglob("*"):
        if f.is_file():
            e, p, f1, t, f2 = (int(i) for i in f.relative_to(store / "jacobian" / "c").parts)
            if not keep(p, t):
                f.write_bytes(b"not a chunk")
                n += 1
    return n


@pytest.fixture(scope="module")
def chunked_store(tmp_path_factory):
    """A real causal store, T=24, chunks of 4 output steps x 4 input steps; and its values."""
    import keras

    import jacstream

    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((None, 1)), keras.layers.LSTM(3, return_sequences=True),
                              keras.layers.Dense(1)])
    x = np.random.default_rng(8).normal(size=(2, 24, 1)).astype("float32")
    path = tmp_path_factory.mktemp("zoom") / "j.zarr"
    J = jacstream.jacobian(model, x, path, block_size=4, in_chunk=4, progress=False)
    assert J.array.chunks == (2, 4, 1, 4, 1)
    return path, J[...]


def test_zoomed_plots_read_only_the_chunks_in_the_window(chunked_store, tmp_path):
    import shutil

    import jacstream
    from jacstream.cli import main

    src, values = chunked_store
    store = tmp_path / "j.zarr"
    shutil.copytree(src, store)
    # Output steps 8..15 are chunks 2, 3; input steps 4..11 chunks 1, 2. Lags 0..5 of
    # output steps 16..23 (chunks 4, 5) need input steps 11..23: chunks 2..5.
    assert _corrupt_chunks_outside(store, lambda p, t: (p in (2, 3) and t in (1, 2))
                                   or (p in (4, 5) and t >= 2)) == 10
    J = jacstream.open(store)
    with pytest.raises(RuntimeError):   # what was corrupted is really unreadable (zarr decode)
        plot.heatmap(J)
    fig = plot.heatmap(J, out_steps=slice(8, 16), in_steps=slice(4, 12))
    np.testing.assert_allclose(image_of(fig), np.abs(values[0, 8:16, 0, 4:12, 0]), rtol=1e-6)
    fig = plot.heatmap(J, out_steps=slice(16, 24), max_lag=5)
    want = [[abs(values[0, t1, 0, t1 - lag, 0]) for lag in range(6)] for t1 in range(16, 24)]
    np.testing.assert_allclose(image_of_first(fig), want, rtol=1e-6)
    # the same through the command line
    for flags, name in ((["--out-steps", "8:16", "--in-steps", "4:12"], "window.png"),
                        (["--out-steps", "16:", "--max-lag", "5", "--log"], "band.png")):
        assert main(["plot", str(store), *flags, "-o", str(tmp_path / name), "-q"]) == 0
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_zoom_errors_name_the_flags(chunked_store, tmp_path, capsys):
    from jacstream.cli import main

    store = chunked_store[0]
    cases = [(["--in-steps", "0:5", "--max-lag", "3"], "--in-steps and --max-lag both choose"),
             (["--out-steps", "30:40"], "--out-steps 30:40 selects no output step"),
             (["--kind", "lag", "--out-steps", "0:5"], "Use --kind heatmap"),
             (["--in-steps", "5"], "is not a range of steps")]
    for flags, match in cases:
        code = main(["plot", str(store), *flags, "-o", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert code == 2 and match in err, err
        assert len(err.strip().splitlines()) == 1 or "usage:" in err
