"""The public entry points: :func:`jacobian` and :func:`plan`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._inputs import _is_float
from ._inputs import as_inputs as _as_inputs
from ._memory import PeakTracker, current_rss, release_free_memory
from ._plan import CostModel, Plan, make_plan, normalize_out_steps, parse_memory
from ._result import Jacobian
from ._store import JobStore
from ._version import __version__
from .errors import InputError, ModelError, NotAStoreError, ReadOnlyStoreError, StoreMismatchError

__all__ = ["jacobian", "plan"]

CAUSAL_CHOICES = ("auto", True, False)
# Prefix lengths tried for the eager structural checks, shortest first (an eager RNN
# step costs ~3 ms here, and the checks run ~12 forward-pass equivalents); a model
# that needs a longer input is checked on the next, and at worst on the full length.
SHORT_STEPS = (16, 64)
STRATEGY_CHOICES = ("auto", "pfor", "tile", "forward", "sensitivity")
NONFINITE_CHOICES = ("raise", "warn", "ignore")
DTYPE_CHOICES = ("float32", "float16", "bfloat16", "float64")


def default_memory_budget() -> int:
    """2 GiB, or a quarter of the memory available now if that is less."""
    import psutil

    return int(min(2 * 2**30, psutil.virtual_memory().available // 4))


def plan(input_shape: tuple[int, int, int], output_shape: tuple[int, int, int], *,
         out_steps: Any = None, block_size: int | None = None,
         memory_budget: int | str | None = None, examples_per_block: int | None = None,
         causal: bool = False, cost: CostModel | None = None) -> Plan:
    """Plan a job from shapes alone, without TensorFlow.

    The plan :func:`jacobian` makes also measures the model's memory cost;
    this one uses a conservative default cost model unless ``cost`` is given.

    Examples
    --------
    >>> import jacstream
    >>> p = jacstream.plan((10, 300, 1), (10, 300, 1), block_size=50)
    >>> p.n_blocks, p.chunks
    (6, (10, 50, 1, 50, 1))
    """
    return make_plan(input_shape, output_shape, out_steps=out_steps, block_size=block_size,
                     memory_budget=memory_budget, examples_per_block=examples_per_block,
                     causal=causal, cost=cost)


def _fingerprint_inputs(inputs: Any) -> str:
    import hashlib

    h = hashlib.sha256(repr(tuple(inputs.shape)).encode())
    step = max(1, 2**26 // max(1, int(np.prod(inputs.shape[1:])) * 4))
    for i in range(0, inputs.shape[0], step):
        h.update(np.ascontiguousarray(np.asarray(inputs[i:i + step], dtype=np.float32)).tobytes())
    return h.hexdigest()


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if not any(value is c or (isinstance(c, str) and value == c) for c in choices):
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def jacobian(model: Callable[..., Any], inputs: Any, store: str | os.PathLike[str], *,
             out_steps: Any = None, block_size: int | None = None,
             memory_budget: int | str | None = None, examples_per_block: int | None = None,
             causal: bool | str = "auto", strategy: str = "auto", device: str | None = None,
             dtype: str = "float32", overwrite: bool = False, progress: bool = True,
             on_nonfinite: str = "raise", in_chunk: int | None = None,
             on_block: Callable[[Any], None] | None = None, reduce: Any = None,
             client: Any = None, _write: bool = True) -> Any:
    """Compute the per-example Jacobian of a sequence model, streamed into a zarr store.

    ``J[i, a, f1, t2, f2] = d y[i, out_steps[a], f1] / d x[i, t2, f2]`` for
    ``y = model(x)``: the layout of ``tf.GradientTape.batch_jacobian``
    restricted to the chosen output steps. The full tensor never has to fit in
    memory: blocks of output steps are computed by one traced function and
    written to disk as they finish. Calling again with the same arguments on
    an interrupted store resumes it.

    Parameters
    ----------
    model : keras.Model or callable
        Maps a float tensor ``(batch, T_in, F_in)`` to ``(batch, T_out, F_out)``;
        example i of the output must depend only on example i of the input.
    inputs : array-like, path or tf.data.Dataset
        Shape ``(batch, T_in, F_in)``: a NumPy array, ``tf.Tensor``, zarr array,
        the path of a ``.npy`` file or zarr array (read lazily), or a
        ``tf.data.Dataset`` yielding ``x`` or ``(x, y)`` batches (spooled to
        disk beside the store, in order, so it need not fit in memory).
    store : str or path
        Directory of the zarr store: a new path or an empty directory (the store
        is created), or a store this function wrote (resumed, or replaced with
        ``overwrite=True``). Any other file or directory is refused and left as
        it is.
    out_steps : None, int, slice or sequence of int, optional
        Output steps to differentiate, with these rules:

        * ``None``: every step ``0..T_out-1``;
        * an int: that one step; negative counts from the end (``-1`` is the last);
        * a slice: taken as on a NumPy array (``slice(0, None, 10)``); its step
          must be positive;
        * a sequence (list, tuple, range, integer array) of ints: each in
          ``-T_out..T_out-1``, negative from the end, strictly increasing once
          made non-negative (sorted, no duplicates: pass ``sorted(set(s))``).

        Out of range, empty, unsorted, duplicated or non-integer steps raise
        :class:`~jacstream.errors.InputError`. Axis 1 of the result follows
        this order (``result.out_steps``).
    block_size : int, optional
        Output steps per block (input steps per block with ``strategy="forward"``).
        By default chosen from ``memory_budget`` and a measurement of the
        model's memory per step.
    memory_budget : int or str, optional
        Bound on the working memory of the computation, e.g. ``"1GiB"``.
        Default: 2 GiB or a quarter of available memory, whichever is less.
    examples_per_block : int, optional
        Examples per block (default: all, or fewer if the budget needs it).
    causal : {"auto", True, False}
        ``True`` promises that output step t depends only on input steps
        ``<= t``: each block then reads only the inputs it needs and the zero
        upper triangle is never computed or stored. ``"auto"`` uses it only
        when the model's layers and a numerical check both show causality.
    strategy : {"auto", "pfor", "tile", "forward", "sensitivity"}
        How a block is differentiated: vectorised reverse mode (``"pfor"``),
        reverse mode over copies of each example (``"tile"``), forward mode
        over blocks of input steps (``"forward"``; pays when ``F_in x T_in`` is
        well below ``F_out x`` the output steps), or, for models that are a
        chain of per-step layers around forward RNN layers, one forward sweep
        of the linearised recurrence (``"sensitivity"``: by far the fastest
        where it applies; other models raise ModelError). All are exact. ``"auto"``
        predicts the fastest from the shapes and the model, times real blocks
        when the job is long enough to pay for it, and records the choice and
        its timings in ``result.attrs["strategy_choice"]``.
    device : str, optional
        ``"cpu"``, ``"gpu"``, ``"gpu:1"``, ``"/device:CPU:0"``...; default: a GPU
        if TensorFlow sees one. On a GPU the RNN layers run without the cuDNN
        kernel (it has no vectorised or second derivative) and
        ``memory_budget`` bounds device memory.
    dtype : {"float32", "float16", "bfloat16", "float64"}
        Storage dtype; the computation is in float32 and each value is rounded
        once when stored. float16 keeps a relative error under 2**-11 (~4.9e-4)
        for magnitudes 6.1e-5..65504 (smaller ones lose digits or become 0;
        larger ones are refused); bfloat16 keeps float32's range with a
        relative error under 2**-8 (~3.9e-3). Half the disk of float32.
    overwrite : bool
        Replace an existing store made for another job.
    progress : bool
        Show a progress bar (only on a terminal).
    on_nonfinite : {"raise", "warn", "ignore"}
        What to do when a block holds NaN or Inf.
    in_chunk : int, optional
        Input steps per zarr chunk (default: the block size, widened until a
        chunk holds 128 KiB). With ``in_chunk == block_size`` the zero triangle
        of a causal model falls exactly on unwritten chunks.
    on_block : callable, optional
        Called with each block (a :class:`jacstream.Block`) once it is safely stored.
    reduce : str or jacstream.analysis.Reduction, optional
        Reduce each block as soon as it is computed and keep only the reduced
        result, never the full Jacobian: a name of :mod:`jacstream.analysis`
        (``"lag_profile"``, ``"influence_map"``, ``"top_k"``,
        ``"feature_importance"``) or ``analysis.reduction(name, **kwargs)``.
        The result is saved at ``store`` (which may then be None) and loaded
        again, not recomputed, by a later identical call.
    client : dask.distributed.Client, optional
        Run the blocks as tasks on this dask cluster instead of in this process.
        Every worker loads the model once and writes its blocks straight into
        ``store``, which must be on a filesystem all workers see at the same
        path. ``memory_budget`` then applies to each worker process (default:
        2 GiB or a quarter of the smallest worker memory limit). Runs resume
        across executors: a distributed run can be finished locally and back.

    Returns
    -------
    Jacobian
        A lazy view of the store; index it like a NumPy array. With ``reduce``,
        the reduced result instead (an xarray object, as the analysis function
        returns it).

    Raises
    ------
    jacstream.errors.InputError
        An argument is malformed: inputs not a float ``(batch, steps, features)``
        array with no empty axis, out_steps breaking the rules above, a
        ``block_size`` that is not a positive int, an unknown option value.
    jacstream.errors.BudgetError
        ``memory_budget`` is unparseable, not positive, or too small for one step.
    jacstream.errors.ModelError
        The model fails on the inputs, returns other than float ``(batch, steps,
        features)``, mixes examples across the batch, is random, or is not
        differentiable (integer cast, stop_gradient, argmax...) where its outputs
        depend on its inputs.
    jacstream.errors.NonFiniteError
        A block holds NaN/Inf (with ``on_nonfinite="raise"``).
    jacstream.errors.StoreError
        The store path is another kind of file or directory, cannot be created or
        written, or holds another job. An existing store is never changed by a
        call that fails before computing.
    jacstream.errors.DeviceError
        ``device`` does not exist.

    All are :class:`jacstream.JacstreamError` and also the matching builtin
    (``ValueError``, ``OSError``...).

    Examples
    --------
    >>> import jacstream, keras, numpy as np, tempfile, os
    >>> model = keras.Sequential([keras.Input((None, 1)),
    ...                           keras.layers.LSTM(8, return_sequences=True),
    ...                           keras.layers.Dense(1)])
    >>> x = np.random.default_rng(0).normal(size=(4, 30, 1)).astype("float32")
    >>> path = os.path.join(tempfile.mkdtemp(), "jac.zarr")
    >>> J = jacstream.jacobian(model, x, path, progress=False)
    >>> J.shape
    (4, 30, 1, 30, 1)
    >>> bool(abs(J[0, 5, 0, 6:, 0]).max() == 0)   # causal: no look-ahead
    True
    """
    t_call = time.perf_counter()
    rss0 = current_rss()
    _check_arguments(model, block_size, causal, strategy, on_nonfinite, dtype, client)
    x = _as_inputs(inputs, scratch=store)
    budget = parse_memory(memory_budget)
    # With reduce=, only the reduced result is stored: no JobStore.
    reduction = None
    if reduce is not None:
        from ._reduce import as_reduction

        reduction = as_reduction(reduce)
    path = Path(store) if store is not None or reduction is None else None
    existing = None
    if reduction is None:
        assert path is not None
        existing = _existing_store(path)
        if existing is None or overwrite:
            JobStore.check_creatable(path)
    resuming = existing is not None and not overwrite

    from . import _tf  # TensorFlow is imported only from here on

    dev = _tf.resolve_device(device)
    m = _inspect_model(model, x, dev, out_steps)
    fixed = existing.plan.strategy if resuming and existing is not None else (
        None if strategy == "auto" else strategy)
    if reduction is not None:  # streaming reductions walk blocks of output steps
        if fixed == "forward":
            raise InputError("reduce= needs blocks of output steps: use strategy='pfor', "
                             "'tile' or 'auto', not 'forward'.")
        fixed = fixed or "pfor"
    build = _Builder(m, dev, model)
    t_out = m.t_out_before_tracing(build, fixed)
    steps = normalize_out_steps(out_steps, t_out)
    if causal == "auto" and m.builtin_chain is not None and m.t_in == t_out:
        is_causal, reason = True, f"{m.builtin_chain}: causal by construction"
    elif causal == "auto":
        is_causal, reason = (_tf.detect_causal(model, m.call, m.short, dev)
                             if m.t_in == t_out else (False, "output and input lengths differ"))
    else:
        is_causal, reason = bool(causal), f"set by the caller (causal={bool(causal)})"
    job = {
        "model": _tf.fingerprint_model(model),
        "inputs": _fingerprint_inputs(x),
        "input_shape": [m.batch, m.t_in, m.f_in],
        "output_shape": [m.batch, t_out, m.f_out],
        "out_steps": list(steps),
        "causal": is_causal,
        "dtype": dtype,
        "layout": ["example", "out_step", "out_feature", "in_step", "in_feature"],
    }
    precomputed: dict[int, Any] = {}
    if resuming:
        assert existing is not None and path is not None
        fn, the_plan = _resume(existing, path, build, job, block_size=block_size,
                               examples_per_block=examples_per_block, in_chunk=in_chunk,
                               strategy=strategy)
        js = existing
        if not JobStore.writable(path):
            missing = the_plan.n_blocks - len(js.done_blocks())
            if missing == 0:
                return Jacobian(js)  # nothing to write: read it where it is
            raise ReadOnlyStoreError(
                f"the store {str(path)!r} is read-only (permissions or a read-only file "
                f"system) and {missing} of its {the_plan.n_blocks} blocks are still to be "
                "computed. Make it writable, or copy it to a writable place and call again "
                "with the copy's path.")
    else:
        if budget is None and block_size is None:
            budget = (_dask_budget(client) if client is not None else None) or \
                default_memory_budget()
        fn, the_plan, choice, precomputed = _new_plan(
            model, m, x, build, fixed, job, dev, rss0,
            (block_size, examples_per_block, budget, in_chunk), dtype)
        if reduction is not None:
            from ._reduce import run_streaming

            return run_streaming(reduction, the_plan, x, fn, path, job, overwrite=overwrite,
                                 progress=progress, on_nonfinite=on_nonfinite,
                                 on_block=on_block, t_out=t_out)
        assert path is not None
        js = JobStore.create(path, the_plan, {**job, "causal_reason": reason,
                                              "model_rewrites": m.prepared.rewritten,
                                              "device": dev, "strategy_choice": choice},
                             overwrite=overwrite)

    with PeakTracker() as tracker:
        if client is None:
            stats = _run(the_plan, js, x, fn, progress, on_nonfinite, on_block, t_out, _write,
                         precomputed, rss0)
        else:
            from ._dask import run_dask

            stats = run_dask(the_plan, js, x, model, client=client, job=job, device=device,
                             sample=m.short, static=fn.static, t_out=t_out, progress=progress,
                             on_nonfinite=on_nonfinite, on_block=on_block)
    run = {
        "version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": dev,
        "blocks_computed": len(stats.computed_blocks),
        "blocks_skipped": stats.skipped_blocks,
        "wall_seconds": round(time.perf_counter() - t_call, 3),
        "compute_seconds": round(stats.compute_seconds, 3),
        "write_seconds": round(stats.write_seconds, 3),
        "traces": fn.traces,
        "strategy": the_plan.strategy,
        "peak_rss_increase": max(tracker.peak - rss0, 0),
        "nonfinite_blocks": stats.nonfinite_blocks,
        "blocks_from_trial": stats.precomputed_blocks,
    }
    if client is None and the_plan.strategy == "sensitivity":
        # (input step, output step) pairs of the causal prefix carried by the sweep, and
        # those dropped because their column of ds/dx was exactly zero.
        run["sensitivity"] = {"column_steps_carried": int(fn.swept_columns),
                              "column_steps_dropped_as_zero": int(fn.dropped_columns)}
    if client is not None:
        run.update(stats.run_info())   # executor, scheduler, traces per worker
    js.record_run(run)
    result = Jacobian(js)
    result.stats = {**run, "computed_blocks": stats.computed_blocks}
    return result


def _check_arguments(model: Any, block_size: Any, causal: Any, strategy: Any,
                     on_nonfinite: Any, dtype: Any, client: Any) -> None:
    """Refuse malformed options before anything is read, created or imported."""
    _check_choice("causal", causal, CAUSAL_CHOICES)
    _check_choice("strategy", strategy, STRATEGY_CHOICES)
    _check_choice("on_nonfinite", on_nonfinite, NONFINITE_CHOICES)
    _check_choice("dtype", dtype, DTYPE_CHOICES)
    if client is not None:
        from ._dask import check_client

        check_client(client)
    if not callable(model):
        raise InputError(f"model must be a Keras model or a callable, got {type(model).__name__}.")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size < 1):
        raise InputError(f"block_size must be a positive int (output steps per block), got "
                         f"{block_size!r}.")


@dataclass
class _ModelInfo:
    """What the eager checks learned about the model on the job's inputs."""

    prepared: Any          # _tf.PreparedModel: the call path used from here on
    sample: np.ndarray     # the first (up to) 2 examples at full length
    short: np.ndarray      # a prefix of ``sample``: the eager checks ran on it
    y_short: np.ndarray    # the model's output on ``short``
    batch: int
    t_in: int
    f_in: int
    f_out: int
    # Why the model is a chain of Keras' own layers (None if it is not): such a model is
    # per example, deterministic, differentiable and causal by its layers' definitions.
    builtin_chain: str | None = None

    @property
    def call(self) -> Any:
        return self.prepared.call

    def t_out_before_tracing(self, build: _Builder, fixed: str | None) -> int:
        """The output length at the full input length, tracing only what must be."""
        if fixed is not None:
            return int(build(fixed).t_out)
        if self.short.shape[1] == self.t_in:   # the eager pass had the full length
            return int(self.y_short.shape[1])
        if self.y_short.shape[1] == self.short.shape[1]:
            # strategy="auto" traces nothing before choosing: a prefix gave as many
            # outputs as inputs (checked once the chosen function is traced).
            return self.t_in
        return int(build("tile").t_out)


def _inspect_model(model: Any, x: Any, dev: str, out_steps: Any) -> _ModelInfo:
    """Call the model eagerly on a prefix of two examples and run the structural checks.

    Raises ModelError for outputs of the wrong rank, batch or dtype, for a model
    that mixes examples or is random, or that is not differentiable.
    """
    from . import _tf

    batch, t_in, f_in = (int(s) for s in x.shape)
    sample = np.ascontiguousarray(np.asarray(x[: min(2, batch)]))
    prepared, short, y_short = _prepare(model, sample, dev)
    if y_short.ndim != 3 or y_short.shape[0] != short.shape[0]:
        raise ModelError(
            f"the model must map inputs (batch, steps, features) to outputs (batch, steps, "
            f"features) with the same batch size; for inputs of shape {short.shape} it returned "
            f"shape {y_short.shape}. Return sequences (e.g. LSTM(return_sequences=True)), keep "
            "the batch axis first and one output per input example.")
    if not _is_float(y_short.dtype):
        raise ModelError(
            f"the model returned outputs of dtype {y_short.dtype}; only floating-point outputs "
            "can be differentiated. Return the float values before any cast, argmax or round.")
    if short.shape[1] == t_in:  # the eager output has the full length: fail before tracing
        normalize_out_steps(out_steps, int(y_short.shape[1]))
    from ._sensitivity import builtin_chain

    trusted, why = builtin_chain(model)
    if not trusted:   # Keras' own per-step and RNN layers hold these by definition
        _tf.check_batch_independence(prepared.call, short, dev, y_short)
        _tf.check_differentiable(prepared.call, short, dev)
    return _ModelInfo(prepared, sample, short, y_short, batch, t_in, f_in, int(y_short.shape[2]),
                      why if trusted else None)


class _Builder:
    """The validated block function of each strategy, traced once per call."""

    def __init__(self, m: _ModelInfo, dev: str, model: Any = None) -> None:
        self.m, self.dev, self.model = m, dev, model
        self.fns: dict[str, Any] = {}

    def keep_only(self, name: str) -> None:
        """Drop every other strategy's function and return the memory it held."""
        dropped = [k for k in self.fns if k != name]
        for k in dropped:
            del self.fns[k]
        if dropped:
            import gc

            gc.collect()
            release_free_memory()

    def __call__(self, name: str) -> Any:
        if name not in self.fns:
            from . import _tf

            m = self.m
            if name == "sensitivity":
                from . import _sensitivity

                f: Any = _sensitivity.build(self.model, m.call, m.f_in, m.f_out, self.dev,
                                       m.batch, m.t_in)
            else:
                f = _tf.BlockFunction(m.call, name, m.f_in, m.f_out, self.dev)
            if name == "sensitivity":
                f.validate(m.sample, m.short, m.y_short.shape, m.y_short)
            else:
                f.validate(m.sample, m.short, m.y_short.shape)
            self.fns[name] = f
        return self.fns[name]


def _resume(existing: JobStore, path: Path, build: _Builder, job: dict[str, Any], *,
            strategy: str, **asked: Any) -> tuple[Any, Plan]:
    """The block function and stored plan of a store being resumed, checked against the call."""
    stored = existing.plan
    fn = build(stored.strategy)
    existing.check_same_job(job)
    asked["strategy"] = None if strategy == "auto" else strategy
    for key, value in asked.items():
        if value is not None and value != getattr(stored, key):
            raise StoreMismatchError(
                f"the store {str(path)!r} is being written with {key}={getattr(stored, key)!r}"
                f", this call asks for {key}={value!r}. Resume with the same {key} (or leave "
                "it out), or pass overwrite=True to start again.")
    _bind(fn, stored)
    return fn, stored


def _new_plan(model: Any, m: _ModelInfo, x: Any, build: _Builder, fixed: str | None,
              job: dict[str, Any], dev: str, rss0: int, options: tuple[Any, ...],
              dtype: str) -> tuple[Any, Plan, dict[str, Any], dict[int, Any]]:
    """Choose the strategy (or take the fixed one) and plan the job with measured costs.

    Returns the block function, its plan, the record of the choice, and blocks
    already computed by the strategy trial.
    """
    block_size, examples_per_block, budget, in_chunk = options
    batch, t_in, t_out = m.batch, m.t_in, job["output_shape"][1]
    overhead: list[int] = []

    def plan_for(f: Any) -> Plan:
        """The plan of a validated block function, with its own measured memory cost."""
        cost = None
        if block_size is None:
            cost = f.probe_cost(m.sample)  # two examples: the cost is per example
            # What tracing and probing took, measured once (after a trial block the
            # allocator keeps that block's memory, which the next block reuses), with
            # the probes' freed memory returned first: the blocks' own peaks count it.
            if not overhead:
                release_free_memory()
            overhead.append(overhead[0] if overhead else current_rss() - rss0)
            cost = _scale_fixed(cost, overhead[-1])
        p = make_plan((batch, t_in, m.f_in), (batch, t_out, m.f_out),
                      out_steps=job["out_steps"], block_size=block_size,
                      examples_per_block=examples_per_block, memory_budget=budget,
                      causal=job["causal"], strategy=f.strategy, dtype=dtype, cost=cost,
                      in_chunk=in_chunk)
        _bind(f, p)
        return p

    precomputed: dict[int, Any] = {}
    if fixed is not None:
        fn = build(fixed)
        the_plan = plan_for(fn)
        choice = {"strategy": fixed, "reason": "set by the caller", "trial_seconds": {},
                  "notes": list(fn.notes)}
    else:
        fn, the_plan, choice, precomputed = _choose_strategy(
            model, m.call, x, build, plan_for, job, dev, (m.f_in, m.f_out), options)
        build.keep_only(fn.strategy)  # the other candidates' graphs and memory go
    if fn.t_out != t_out:
        raise ModelError(
            f"the model returned {fn.t_out} output steps for {t_in} input steps when "
            f"traced, but {m.y_short.shape[1]} for a prefix of {m.short.shape[1]} steps when "
            "called eagerly; jacstream needs a model whose output length follows its "
            "input length the same way in both. Pass strategy='pfor' to check the full "
            "length first.")
    if fn.strategy == "forward":
        choice["forward_impl"] = fn.impl
    return fn, the_plan, choice, precomputed


def _prepare(model: Any, sample: np.ndarray, dev: str) -> tuple[Any, np.ndarray, np.ndarray]:
    """The prepared model, the prefix of ``sample`` it runs on, and its output there.

    The structural checks run eagerly on a short prefix (eager RNNs are slow); a
    model that fails on one (e.g. a valid convolution longer than it) is tried on
    a longer one, and at last on the full length, whose failure is reported.
    """
    from . import _tf

    lengths = [n for n in SHORT_STEPS if n < sample.shape[1]] + [sample.shape[1]]
    for n in lengths:
        short = sample[:, :n]
        try:
            prepared = _tf.prepare_model(model, short, dev)
            y = prepared.output if prepared.output is not None else \
                _tf.forward(prepared.call, short, dev)
            return prepared, short, np.asarray(y)
        except Exception as e:
            if n == lengths[-1]:
                raise ModelError(
                    f"calling the model on inputs of shape {short.shape} (float32) failed with "
                    f"{type(e).__name__}: {_first_line(e)}. Check that the inputs have the "
                    "length and number of features the model was built for.") from e
    raise AssertionError("unreachable")


def _dask_budget(client: Any) -> int | None:
    from ._dask import default_worker_budget

    return default_worker_budget(client)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _existing_store(path: Path) -> JobStore | None:
    """The jacstream store at ``path``; None for a new path or an empty directory.

    Anything else there is refused, whatever ``overwrite`` says: jacstream only
    ever replaces a store it wrote itself.
    """
    if JobStore.exists(path):
        return JobStore.open(path, mode="r+")  # NotAStoreError for a foreign zarr store
    if path.is_file():
        raise NotAStoreError(
            f"store={str(path)!r} is a file, not a jacstream store. Pass the path of a new "
            "directory (it is created) or of a store written by jacstream.jacobian().")
    if path.is_dir() and any(path.iterdir()):
        names = sorted(p.name for p in path.iterdir())
        shown = ", ".join(map(repr, names[:4])) + (", ..." if len(names) > 4 else "")
        raise NotAStoreError(
            f"store={str(path)!r} is a directory that is not a jacstream store (it holds "
            f"{shown}). jacstream writes only into a new or empty directory or a store of its "
            "own, and never replaces anything else, even with overwrite=True. Choose a new "
            "path.")
    return None


def _bind(fn: Any, the_plan: Plan) -> None:
    """Tell a block function the plan's block lengths (used only in static-shape mode)."""
    fn.static_block = the_plan.block_size
    fn.static_idx = len(the_plan.out_steps)


def _choose_strategy(model: Any, call: Any, x: Any, build: Any, plan_for: Any,
                     job: dict[str, Any], dev: str, features: tuple[int, int],
                     options: tuple[Any, ...]) -> tuple[Any, Plan, dict[str, Any], dict[int, Any]]:
    """strategy="auto": predict from the shapes, then time real blocks (see _strategy)."""
    from . import _strategy, _tf

    (batch, t_in, f_in), f_out = job["input_shape"], features[1]
    kind, n_params = _tf.model_kind(model, call, f_in)
    shapes = _strategy.Shapes(batch, t_in, f_in, f_out, tuple(job["out_steps"]), job["causal"],
                              kind, n_params)
    names, notes = _strategy.candidates(shapes)
    if "sensitivity" in names:
        from ._sensitivity import NotApplicable, decompose

        try:   # pure Python: which layers the model has, not yet whether they reproduce it
            decompose(model)
        except NotApplicable as e:
            names.remove("sensitivity")
            notes.append(f"sensitivity unavailable: {e}")

    def run_block(fn: Any, the_plan: Plan, block: Any) -> Any:
        e0, e1 = block.examples
        p0, p1 = block.positions
        idx = np.asarray(the_plan.out_steps[p0:p1], dtype=np.int32)
        extra = () if block.in_steps is None else (block.in_steps,)
        return fn(np.asarray(x[e0:e1]), idx, block.in_len, *extra)

    # Per model and shapes (not the input values: their speed is the same).
    key = (job["model"], tuple(job["input_shape"]), tuple(job["out_steps"]), job["causal"],
           job["dtype"], dev, options)
    choice = _strategy.choose(names, shapes, build=build, plan_for=plan_for,
                              run_block=run_block, cache_key=key,
                              unavailable=(_tf.StrategyUnavailable,))
    record = {**choice.record, "notes": notes + choice.record.get("notes", [])}
    return choice.fn, choice.plan, record, choice.precomputed


def _scale_fixed(cost: CostModel, overhead: int) -> CostModel:
    """Count what tracing and the probes already took as part of the fixed cost."""
    from dataclasses import replace

    return replace(cost, fixed=cost.fixed + max(0, overhead))


def _run(the_plan: Plan, js: JobStore, x: Any, fn: Any, progress: bool, on_nonfinite: str,
         on_block: Any, t_out: int, write: bool, precomputed: Any = None,
         rss0: int | None = None) -> Any:
    from ._execute import run_local

    trim_above = None if rss0 is None else rss0 + the_plan.estimated_peak
    return run_local(the_plan, js, x, fn, progress=progress, on_nonfinite=on_nonfinite,
                     on_block=on_block, t_out=t_out, write=write, precomputed=precomputed,
                     trim_above=trim_above)
