"""The catalogue of misuses (issue 9): each gets a clear JacstreamError, and nothing is lost.

One table of bad calls. Every case asserts the exception type (a JacstreamError
that is also the matching builtin), key words of its message, and that the
working directory - a finished store, foreign files, a read-only store - is
byte for byte what it was before the call (no store made, no temporary left).
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_jacobian_close, reference_jacobian

import jacstream
from jacstream import errors as E
from jacstream.store.jobstore import done_dir

B, T, F = 3, 10, 2


def _keras_model(f_in: int = F):
    """A small causal Conv1D model (fast to trace)."""
    import keras

    keras.utils.set_random_seed(3)
    L = keras.layers
    return keras.Sequential([keras.Input((None, f_in)),
                             L.Conv1D(4, 3, padding="causal", activation="tanh"), L.Dense(1)])


def _batchnorm_training():
    import keras

    class Normed(keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.bn = keras.layers.BatchNormalization()

        def call(self, h):
            return self.bn(h, training=True)  # batch statistics: examples interact

    inp = keras.Input((None, F))
    return keras.Model(inp, keras.layers.Dense(1)(Normed()(keras.layers.Dense(3)(inp))))


def _nan_after_step(t: int):
    """x * c with c = 1 before step t and NaN from it: later blocks are NaN, earlier fine.

    multiply_no_nan keeps the NaN out of the rows of earlier steps (0 * NaN is 0 there).
    """
    c = tf.constant(np.where(np.arange(T) < t, 1.0, np.nan).astype("float32")[None, :, None])
    return lambda x: tf.math.multiply_no_nan(c, x)


def _closure_over(x: np.ndarray):
    """A model closing over a tensor of the whole batch (a block holds fewer examples)."""
    whole = tf.constant(x)
    return lambda v: v * whole


# --------------------------------------------------------------------------- the table
@dataclass
class Ctx:
    root: Path       # everything under it is snapshotted around the call
    store: Path      # a finished store of the good model
    new: Path        # a path where nothing exists yet
    model: Any
    x: np.ndarray

    def run(self, **kw: Any) -> Any:
        args = {"model": self.model, "inputs": self.x, "store": self.store, "progress": False}
        args.update(kw)
        return jacstream.jacobian(args.pop("model"), args.pop("inputs"), args.pop("store"),
                                  **args)


@dataclass
class Case:
    id: str
    call: Callable[[Ctx], Any]
    exc: type[Exception]
    builtin: type[Exception]
    words: tuple[str, ...]
    leaves: bool = False  # the call makes a store at ctx.new (blocks before the failure)
    setup: Callable[[Ctx], None] | None = None
    marks: list[Any] = field(default_factory=list)


def _foreign_dir(c: Ctx) -> None:
    c.new.mkdir()
    (c.new / "thesis.tex").write_text("precious")


def _foreign_zarr(c: Ctx) -> None:
    import zarr

    g = zarr.open_group(str(c.new), mode="w")
    g.create_array("data", shape=(3,), dtype="int8")[:] = [1, 2, 3]


def _incomplete_copy(c: Ctx) -> None:
    shutil.copytree(c.store, c.new)
    for marker in sorted(done_dir(c.new).iterdir())[1:]:
        marker.unlink()


def _read_only(path: Path) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o444)
    for dirpath, _dirs, _files in list(os.walk(path))[::-1]:
        os.chmod(dirpath, 0o555)


def _writable_again(path: Path) -> None:
    for dirpath, _dirs, files in os.walk(path):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)


IN, MO, NF, OS, ST = E.InputError, E.ModelError, E.NonFiniteError, E.NotAStoreError, E.StoreError
NOT_DIFF = ("not differentiable", "integer cast", "stop_gradient", "argmax")

CASES = [
    # -- inputs
    Case("inputs_rank2", lambda c: c.run(inputs=c.x[..., 0]), IN, ValueError,
         ("inputs", "(batch, steps, features)", "(3, 10)", "rank 2", "inputs[..., None]")),
    Case("inputs_rank4", lambda c: c.run(inputs=c.x[None]), IN, ValueError,
         ("inputs", "(batch, steps, features)", "rank 4")),
    Case("inputs_int", lambda c: c.run(inputs=c.x.astype(np.int64)), IN, ValueError,
         ("inputs", "floating point", "int64", "astype('float32')")),
    Case("inputs_strings", lambda c: c.run(inputs=c.x.astype(str)), IN, ValueError,
         ("inputs", "floating point", "<u")),
    Case("inputs_none", lambda c: c.run(inputs=None), IN, ValueError,
         ("inputs must be an array", "nonetype")),
    Case("inputs_batch0", lambda c: c.run(inputs=c.x[:0]), IN, ValueError,
         ("empty axis", "(0, 10, 2)", "at least one example")),
    Case("inputs_empty_steps", lambda c: c.run(inputs=c.x[:, :0], overwrite=True), IN,
         ValueError, ("empty axis", "(3, 0, 2)")),
    # -- several inputs (a sequence and a static vector)
    Case("inputs_several_without_wrt", lambda c: c.run(inputs={"seq": c.x, "static": c.x[:, 0]}),
         IN, ValueError, ("wrt is missing", "'seq' (shape (3, 10, 2))", "'static' (shape (3, 2))")),
    Case("inputs_several_unknown_wrt",
         lambda c: c.run(inputs=[c.x, c.x[:, 0]], wrt="seq"), IN, ValueError,
         ("wrt is 'seq'", "one of 0 (shape (3, 10, 2)), 1 (shape (3, 2))")),
    Case("inputs_several_batch_differs",
         lambda c: c.run(inputs={"seq": c.x, "static": c.x[:2, 0]}, wrt="seq"), IN, ValueError,
         ("input 'static' has 2 examples", "input 'seq' has 3", "one entry per example")),
    Case("inputs_wrt_of_one_array", lambda c: c.run(wrt=0), IN, ValueError,
         ("wrt=0", "inputs is one array", "leave wrt out")),
    Case("model_closes_over_the_batch",
         lambda c: c.run(model=_closure_over(c.x), store=c.new), MO, ValueError,
         ("calling the model", "several inputs", "wrt='seq'", "closure")),
    # -- model output shapes
    # (batch, features) outputs are one output step (tests/test_core.py), not an error
    Case("model_4d_output", lambda c: c.run(model=lambda x: x[..., None]), MO, ValueError,
         ("(batch, steps, features)", "or (batch, features) for one output step",
          "returned shape (2, 10, 2, 1)", "keras.layers.reshape")),
    Case("model_1d_output", lambda c: c.run(model=lambda x: tf.reduce_sum(x, axis=[1, 2])),
         MO, ValueError, ("returned shape (2,)", "batch axis first")),
    Case("model_batch_differs", lambda c: c.run(model=lambda x: tf.concat([x, x], 0)), MO,
         ValueError, ("same batch size", "(2, 10, 2)", "(4, 10, 2)")),
    Case("model_int_outputs", lambda c: c.run(model=lambda x: tf.cast(x * 10, tf.int32)), MO,
         ValueError, ("dtype int32", "floating-point")),
    Case("model_rejects_inputs", lambda c: c.run(model=_keras_model(f_in=3)), MO, ValueError,
         ("calling the model", "(2, 10, 2)", "number of features")),
    # -- examples that interact, random models
    Case("batch_mean", lambda c: c.run(model=lambda x: x - tf.reduce_mean(x, 0, keepdims=True)),
         MO, ValueError, ("mixes examples", "batch", "batch_jacobian")),
    Case("batchnorm_training", lambda c: c.run(model=_batchnorm_training()), MO, ValueError,
         ("mixes examples", "batchnormalization", "training=false")),
    Case("batch_mix_one_example",
         lambda c: c.run(model=lambda x: x - tf.reduce_mean(x, 0, keepdims=True),
                         inputs=c.x[:1], store=c.new), MO, ValueError, ("mixes examples",)),
    Case("batch_mix_backwards", lambda c: c.run(model=lambda x: tf.cumsum(x, 0, reverse=True)),
         MO, ValueError, ("changing example 1 changed the outputs of example 0",)),
    Case("random_model", lambda c: c.run(model=lambda x: x + tf.random.normal(tf.shape(x))),
         MO, ValueError, ("not deterministic", "dropout", "training=false")),
    # -- the None-gradient trap
    Case("int_cast", lambda c: c.run(model=lambda x: tf.cast(tf.cast(x * 4, tf.int32),
                                                            tf.float32)),
         MO, ValueError, NOT_DIFF + ("no gradient",)),
    Case("stop_gradient", lambda c: c.run(model=lambda x: tf.stop_gradient(x) * 2), MO,
         ValueError, NOT_DIFF + ("none",)),
    Case("stop_gradient_tile", lambda c: c.run(model=lambda x: tf.stop_gradient(x) * 2,
                                               strategy="tile", store=c.new),
         MO, ValueError, NOT_DIFF),
    Case("argmax", lambda c: c.run(model=lambda x: tf.cast(tf.argmax(x, 2), tf.float32)[..., None]),
         MO, ValueError, NOT_DIFF),
    Case("partial_output_feature",
         lambda c: c.run(model=lambda x: tf.concat([x[..., :1], tf.stop_gradient(x[..., 1:])],
                                                   2)),
         MO, ValueError, NOT_DIFF + ("output feature [1]",)),
    Case("partial_input_feature",
         lambda c: c.run(model=lambda x: x[..., :1] + tf.stop_gradient(x[..., 1:])), MO, ValueError,
         NOT_DIFF + ("input feature [1]",)),
    # -- NaN / Inf in a block: reported with block and steps; earlier blocks kept
    Case("nan_in_block", lambda c: c.run(model=_nan_after_step(6), store=c.new, block_size=3),
         NF, FloatingPointError,
         ("block 2", "output steps [6, 7, 8]", "on_nonfinite='warn'", "safely stored"),
         leaves=True),
    Case("nan_in_inputs", lambda c: c.run(inputs=np.where(c.x > 1.5, np.nan, c.x),
                                          store=c.new),
         NF, FloatingPointError, ("block 0", "inputs of examples", "nan/inf"), leaves=True),
    # -- out_steps (rules: ints in -T..T-1, negative from the end, strictly increasing)
    Case("out_steps_too_big", lambda c: c.run(out_steps=10), IN, ValueError,
         ("out_steps", "step 10", "out of range", "0..9")),
    Case("out_steps_too_negative", lambda c: c.run(out_steps=[-11, 3]), IN, ValueError,
         ("out_steps", "step -11", "out of range")),
    Case("out_steps_empty_list", lambda c: c.run(out_steps=[]), IN, ValueError,
         ("out_steps=[]", "selects no output step")),
    Case("out_steps_empty_slice", lambda c: c.run(out_steps=slice(5, 5)), IN, ValueError,
         ("selects no output step",)),
    Case("out_steps_duplicated", lambda c: c.run(out_steps=[1, 3, 3]), IN, ValueError,
         ("strictly increasing", "step 3 is duplicated", "sorted(set(out_steps))")),
    Case("out_steps_unsorted", lambda c: c.run(out_steps=[4, 2]), IN, ValueError,
         ("strictly increasing", "not increasing")),
    Case("out_steps_negative_wraps_unsorted", lambda c: c.run(out_steps=[-1, 0]), IN,
         ValueError, ("strictly increasing",)),
    Case("out_steps_reversed_slice", lambda c: c.run(out_steps=slice(None, None, -1)), IN,
         ValueError, ("slice step must be positive",)),
    Case("out_steps_float", lambda c: c.run(out_steps=2.5), IN, ValueError,
         ("out_steps must be", "2.5")),
    Case("out_steps_bools", lambda c: c.run(out_steps=[True]), IN, ValueError,
         ("out_steps must hold ints",)),
    # -- block_size and memory_budget
    Case("block_size_zero", lambda c: c.run(block_size=0), IN, ValueError,
         ("block_size", "positive int", "got 0")),
    Case("block_size_negative", lambda c: c.run(block_size=-2, overwrite=True), IN, ValueError,
         ("block_size", "positive int", "got -2")),
    Case("block_size_float", lambda c: c.run(block_size=2.5), IN, ValueError,
         ("block_size", "got 2.5")),
    Case("examples_per_block_zero", lambda c: c.run(examples_per_block=0, store=c.new), IN,
         ValueError, ("examples_per_block", "positive int")),
    Case("budget_zero", lambda c: c.run(memory_budget=0), E.BudgetError, ValueError,
         ("memory_budget", "positive", "got 0")),
    Case("budget_negative", lambda c: c.run(memory_budget="-1GiB"), E.BudgetError, ValueError,
         ("memory_budget", "not a size")),
    Case("budget_unparseable", lambda c: c.run(memory_budget="lots"), E.BudgetError,
         ValueError, ("memory_budget='lots'", "not a size", "'2gib'")),
    Case("budget_wrong_type", lambda c: c.run(memory_budget=[1]), E.BudgetError, ValueError,
         ("memory_budget", "got list")),
    Case("budget_too_small", lambda c: c.run(memory_budget="1KiB", store=c.new), E.BudgetError,
         ValueError, ("too small for even one output step", "raise memory_budget to at least")),
    Case("budget_too_small_for_block",
         lambda c: c.run(memory_budget="1KiB", block_size=2, examples_per_block=1,
                         store=c.new), E.BudgetError, ValueError,
         ("block_size=2", "memory_budget=1.00 kib", "raise memory_budget to at least")),
    # -- stores
    Case("store_foreign_dir", lambda c: c.run(store=c.new), OS, OSError,
         ("not a jacstream store", "thesis.tex", "new path"), setup=_foreign_dir),
    Case("store_foreign_dir_overwrite", lambda c: c.run(store=c.new, overwrite=True), OS,
         OSError, ("not a jacstream store", "even with overwrite=true"), setup=_foreign_dir),
    Case("store_foreign_zarr_overwrite", lambda c: c.run(store=c.new, overwrite=True), OS,
         OSError, ("not a jacstream store", "never replaces"), setup=_foreign_zarr),
    Case("store_is_file", lambda c: c.run(store=c.store / "zarr.json"), OS, OSError,
         ("is a file", "not a jacstream store")),
    Case("store_under_file", lambda c: c.run(store=c.store / "zarr.json" / "j.zarr"), ST,
         OSError, ("cannot create the store", "is a file, not a directory")),
    Case("store_uncreatable", lambda c: c.run(store="/proc/jacstream-test.zarr"),
         E.ReadOnlyStoreError, PermissionError, ("cannot create the store", "not writable"),
         marks=[pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")]),
    Case("store_read_only_parent", lambda c: c.run(store=c.new / "j.zarr"),
         E.ReadOnlyStoreError, PermissionError, ("cannot create the store", "not writable"),
         setup=lambda c: (c.new.mkdir(), _read_only(c.new))),
    Case("store_read_only_incomplete", lambda c: c.run(store=c.new, block_size=4),
         E.ReadOnlyStoreError, PermissionError,
         ("read-only", "2 of its 3 blocks are still to be computed", "copy it"),
         setup=lambda c: (_incomplete_copy(c), _read_only(c.new))),
    Case("store_other_job", lambda c: c.run(inputs=c.x * 2), E.StoreMismatchError,
         FileExistsError, ("made for another job", "inputs", "overwrite=true", "unchanged")),
    Case("store_other_block_size", lambda c: c.run(block_size=3), E.StoreMismatchError,
         FileExistsError, ("block_size=4", "block_size=3", "overwrite=true")),
    # -- devices and options
    Case("device_missing", lambda c: c.run(device="gpu:7"), E.DeviceError, ValueError,
         ("device='gpu:7'", "does not exist", "tensorflow sees", "cpu:0")),
    Case("device_missing_overwrite", lambda c: c.run(device="tpu", overwrite=True),
         E.DeviceError, ValueError, ("device='tpu'", "does not exist")),
    Case("device_not_a_string", lambda c: c.run(device=0), E.DeviceError, ValueError,
         ("device must be a string",)),
    Case("strategy_unknown", lambda c: c.run(strategy="fast"), IN, ValueError,
         ("strategy", "'pfor'", "'tile'", "'fast'")),
    Case("on_nonfinite_unknown", lambda c: c.run(on_nonfinite="skip"), IN, ValueError,
         ("on_nonfinite", "'warn'")),
    Case("causal_unknown", lambda c: c.run(causal="yes"), IN, ValueError,
         ("causal", "'auto'", "'trust'")),
    Case("causal_promise_broken", lambda c: c.run(model=lambda x: x + x[:, -1:], causal=True,
                                                  store=c.new), MO, ValueError,
         ("causal=true promises", "output step 0 depends on the later input step 9",
          "d y[0, 0, :] / d x[0, 9, :] reaches", "causal='auto'", "causal='trust'")),
    Case("dtype_unknown", lambda c: c.run(dtype="int8"), IN, ValueError, ("dtype", "'float32'")),
    Case("model_not_callable", lambda c: c.run(model="model.keras"), IN, ValueError,
         ("model must be", "str")),
]


# --------------------------------------------------------------------------- helpers
def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and directory under root: bytes for files, None for directories."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished store of a small Conv1D model: 3 examples x 10 steps, blocks of 4 steps."""
    root = tmp_path_factory.mktemp("catalogue")
    model = _keras_model()
    x = np.random.default_rng(0).normal(size=(B, T, F)).astype("float32")
    J = jacstream.jacobian(model, x, root / "good.zarr", block_size=4, progress=False)
    assert J.complete and J.n_blocks == 3
    return root, model, x


@pytest.fixture
def deny_writes_as_root(monkeypatch):
    """Make os.access tell the truth chmod tells everyone but root.

    Root writes through chmod 555; a read-only mount stops root too, and is
    what os.access reports then. Here, for root, paths whose owner has no write
    bit are reported as such a mount.
    """
    if os.geteuid() != 0:
        return
    real = os.access

    def access(path: Any, mode: int, *a: Any, **k: Any) -> bool:
        if mode & os.W_OK and os.path.exists(path) and not os.stat(path).st_mode & 0o200:
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)


# --------------------------------------------------------------------------- the walk
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_catalogue(case: Case, finished, tmp_path, deny_writes_as_root):
    root, model, x = finished
    # Each case gets its own directory; the finished store sits beside it.
    work = root / case.id
    work.mkdir()
    ctx = Ctx(root=root, store=root / "good.zarr", new=work / "new.zarr", model=model, x=x)
    try:
        if case.setup is not None:
            case.setup(ctx)
        before = _snapshot(root)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. keras on a model called with odd inputs
            with pytest.raises(case.exc) as info:
                case.call(ctx)
        err = info.value
        assert isinstance(err, jacstream.JacstreamError) and isinstance(err, case.builtin)
        message = str(err).lower()
        missing = [w for w in case.words if w.lower() not in message]
        assert not missing, f"message lacks {missing}:\n{err}"
        after = _snapshot(root)
        if case.leaves:  # a run that failed mid-way keeps its finished blocks at ctx.new
            new = os.path.relpath(ctx.new, root)
            after = {k: v for k, v in after.items() if not k.startswith(new)}
            before = {k: v for k, v in before.items() if not k.startswith(new)}
        changed = sorted(k for k in set(before) | set(after) if before.get(k, b"?") != after.get(k, b"?"))
        assert not changed, f"the call changed or left files: {changed[:10]}"
    finally:
        _writable_again(work)


def test_every_error_class_is_rooted_and_builtin():
    for name in E.__all__:
        cls = getattr(E, name)
        if issubclass(cls, Warning):
            continue
        assert issubclass(cls, jacstream.JacstreamError), name
        if cls is not jacstream.JacstreamError:
            builtins = [b for b in cls.__mro__ if b.__module__ == "builtins"]
            assert builtins[0] is not Exception, f"{name} inherits no builtin but Exception"
    used = {c.exc for c in CASES}
    untested = {getattr(E, n) for n in E.__all__} - used - {
        E.JacstreamError, E.IncompleteStoreWarning, E.StoreWriteError, E.ClusterError,
        E.StoreLockedError}
    # StoreWriteError is raised in test_resume, ClusterError in test_dask, StoreLockedError in
    # test_store_format (it needs a second process writing the store)
    assert not untested, f"no catalogue case raises {untested}"


# --------------------------------------------------------------------------- follow-ups
def test_nonfinite_run_continues_with_warn(tmp_path):
    """The raise keeps the finished blocks; on_nonfinite='warn' resumes and stores the rest."""
    model = _nan_after_step(6)
    x = np.random.default_rng(1).normal(size=(2, T, 1)).astype("float32")
    store = tmp_path / "j.zarr"
    with pytest.raises(E.NonFiniteError, match="block 2"):
        jacstream.jacobian(model, x, store, block_size=3, progress=False)
    kept = {p.name for p in done_dir(store).iterdir()}
    assert kept == {"00000000.done", "00000001.done"}
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        J = jacstream.jacobian(model, x, store, block_size=3, progress=False,
                               on_nonfinite="warn")
    assert J.complete and J.stats["blocks_skipped"] == 2
    assert J.stats["nonfinite_blocks"] == [2, 3]
    ref = reference_jacobian(model, x)
    # Bitwise though the computations differ: every entry of c * x's Jacobian is exactly 0, 1
    # or NaN (no rounding anywhere), and NaN must be where the reference has NaN.
    np.testing.assert_array_equal(J[...], ref)


def test_read_only_finished_store_is_still_readable(tmp_path, deny_writes_as_root):
    """A finished store on a read-only disk: the same call returns it without writing."""
    model = lambda x: x * 3.0  # noqa: E731
    x = np.ones((1, 4, 1), "float32")
    store = tmp_path / "j.zarr"
    jacstream.jacobian(model, x, store, progress=False)
    before = _snapshot(tmp_path)
    _read_only(store)
    try:
        J = jacstream.jacobian(model, x, store, progress=False)
        assert J.complete and float(J[0, 2, 0, 2, 0]) == 3.0
        assert _snapshot(tmp_path) == before
    finally:
        _writable_again(store)


@pytest.mark.parametrize("name, model", [
    ("constant", lambda x: tf.zeros_like(x) + 1.0),
    ("times_zero", lambda x: x * 0.0),
    ("dead_relu", lambda x: tf.nn.relu(x - 100.0)),
    ("ignores_a_feature", lambda x: x[..., :1] * 2.0),
])
@pytest.mark.parametrize("strategy", ["auto", "pfor", "tile", "forward"])
def test_genuine_zero_jacobians_are_not_refused(name, model, strategy, tmp_path):
    """A gradient that is zero because the outputs really do not move is no error."""
    x = np.random.default_rng(2).normal(size=(2, 6, 2)).astype("float32")
    J = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy=strategy, progress=False)
    assert_jacobian_close(J[...], reference_jacobian(model, x), name)


def test_overwrite_replaces_only_after_checks(tmp_path):
    """overwrite=True replaces a store only once the new job is known to be valid."""
    x = np.random.default_rng(3).normal(size=(2, 5, 1)).astype("float32")
    store = tmp_path / "j.zarr"
    jacstream.jacobian(lambda v: v * 2.0, x, store, progress=False)
    before = _snapshot(tmp_path)
    with pytest.raises(E.ModelError):
        jacstream.jacobian(lambda v: tf.stop_gradient(v), x, store, overwrite=True,
                           progress=False)
    assert _snapshot(tmp_path) == before
    J = jacstream.jacobian(lambda v: v * 5.0, x, store, overwrite=True, progress=False)
    assert float(J[0, 1, 0, 1, 0]) == 5.0
    assert sorted(os.listdir(tmp_path)) == ["j.zarr"]  # the old store is gone, no leftovers


def test_empty_directory_is_a_new_store(tmp_path):
    (tmp_path / "j.zarr").mkdir()
    J = jacstream.jacobian(lambda v: v * 2.0, np.ones((1, 3, 1), "float32"), tmp_path / "j.zarr",
                           progress=False)
    assert J.complete and sorted(os.listdir(tmp_path)) == ["j.zarr"]
