"""The public entry points: :func:`jacobian` and :func:`plan`.

They check their arguments and hand over: :func:`plan` to the planner
(:mod:`jacstream.planning`), :func:`jacobian` to the job (:func:`jacstream.run.job.run`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import InputError, check_choice
from .planning import DTYPES, STRATEGIES, CostModel, Plan, make_plan, parse_memory

__all__ = ["jacobian", "plan"]

CAUSAL_CHOICES = ("auto", True, False, "trust")
STRATEGY_CHOICES = ("auto", *STRATEGIES)
NONFINITE_CHOICES = ("raise", "warn", "ignore")


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
    (6, (10, 50, 1, 100, 1))
    """
    return make_plan(input_shape, output_shape, out_steps=out_steps, block_size=block_size,
                     memory_budget=memory_budget, examples_per_block=examples_per_block,
                     causal=causal, cost=cost)


def jacobian(model: Callable[..., Any], inputs: Any, store: str | os.PathLike[str], *,
             out_steps: Any = None, block_size: int | None = None,
             memory_budget: int | str | None = None, examples_per_block: int | None = None,
             causal: bool | str = "auto", strategy: str = "auto", device: str | None = None,
             dtype: str = "float32", overwrite: bool = False, progress: bool = True,
             on_nonfinite: str = "raise", in_chunk: int | None = None,
             on_block: Callable[[Any], None] | None = None, reduce: Any = None,
             client: Any = None, wrt: Any = None) -> Any:
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
        Maps a float tensor ``(batch, T_in, F_in)`` to ``(batch, T_out, F_out)``
        with any ``T_out`` (a horizon, a strided model's shorter output), or to
        ``(batch, F_out)``, taken as one output step (``T_out = 1``: the result
        then has shape ``(batch, 1, F_out, T_in, F_in)``); example i of the
        output must depend only on example i of the input.
    inputs : array-like, path or tf.data.Dataset
        Shape ``(batch, T_in, F_in)``: a NumPy array, ``tf.Tensor``, zarr array,
        the path of a ``.npy`` file or zarr array (read lazily), or a
        ``tf.data.Dataset`` yielding ``x`` or ``(x, y)`` batches (spooled to
        disk beside the store, in order, so it need not fit in memory).
        For a model of several inputs: a dict of them by input name, or a
        list/tuple in the model's order, with ``wrt`` naming the one to
        differentiate (the others: arrays with one entry per example on axis 0).
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
    causal : {"auto", True, False, "trust"}
        ``True`` promises that output step t depends only on input steps
        ``<= t``: each block then reads only the inputs it needs and the zero
        upper triangle is never computed or stored. The promise is checked as
        ``"auto"`` checks it (the Jacobian of one example at a few output steps
        of a short prefix must be zero above the diagonal) and a broken one
        raises ModelError naming the output step and the later input step it
        depends on. ``"trust"``: as ``True``, without the check (a false
        promise then gives a wrong Jacobian, silently). ``"auto"`` uses
        causality only when the model's layers and the numerical check both
        show it. Keras' own chains of per-step and forward RNN layers are
        causal by construction and are not checked numerically. Needs as many
        output steps as input steps (``False`` otherwise).
    strategy : {"auto", "sensitivity", "pfor", "tile", "forward"}
        How a block is differentiated: for models that are a chain of per-step
        layers around forward RNN layers, one forward sweep of the linearised
        recurrence (``"sensitivity"``: by far the fastest where it applies; other
        models raise ModelError); vectorised reverse mode (``"pfor"``), reverse
        mode over copies of each example (``"tile"``), or forward mode over
        blocks of input steps (``"forward"``; pays when ``F_in x T_in`` is well
        below ``F_out x`` the output steps). All are exact. ``"auto"``
        predicts the fastest from the shapes and the model, times real blocks
        when the job is long enough to pay for it, and records the choice and
        its timings in ``result.attrs["strategy_choice"]``.
    device : str, optional
        ``"cpu"``, ``"gpu"``, ``"gpu:1"``, ``"/device:CPU:0"``...; default: a GPU
        if TensorFlow sees one. On a GPU the RNN layers run without the cuDNN
        kernel (it has no vectorised or second derivative) and
        ``memory_budget`` bounds device memory.
    dtype : {"float32", "float16", "bfloat16", "float64"}
        Storage dtype; the computation is in the model's precision (float64 for
        a Keras model with a float64 layer, weight or input, else float32) and
        each value is rounded once when stored (a float32 model stored as
        float64 keeps float32 accuracy). float16 keeps a relative error under 2**-11 (~4.9e-4)
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
    wrt : str or int, optional
        With several inputs: the key (dict) or position (list/tuple) of the one
        to differentiate, e.g. ``jacobian(model, {"seq": x, "static": s}, store,
        wrt="seq")``; the others are passed along with each block's examples.
        Required when there are several; leave it out for one array.

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
        ``block_size`` that is not a positive int, an unknown option value;
        several inputs without a ``wrt`` naming one of them, or whose numbers of
        examples differ.
    jacstream.errors.BudgetError
        ``memory_budget`` is unparseable, not positive, or too small for one step.
    jacstream.errors.ModelError
        The model fails on the inputs, returns other than float ``(batch, steps,
        features)`` or ``(batch, features)``, mixes examples across the batch, is
        random, or is not differentiable (integer cast, stop_gradient, argmax...)
        where its outputs depend on its inputs; ``causal=True`` for a model whose
        outputs depend on later inputs.
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
    from .run.job import Request, run

    _check_arguments(model, block_size, causal, strategy, on_nonfinite, dtype, client)
    budget = parse_memory(memory_budget)
    req = Request(store=store, out_steps=out_steps, block_size=block_size,
                  memory_budget=budget, examples_per_block=examples_per_block, causal=causal,
                  strategy=strategy, device=device, dtype=dtype, overwrite=overwrite,
                  progress=progress, on_nonfinite=on_nonfinite, in_chunk=in_chunk,
                  on_block=on_block, client=client, wrt=wrt)
    if reduce is None:
        return run(model, inputs, req)
    from .analysis.reductions import as_reduction
    from .analysis.streaming import ReductionSink

    # With reduce=, only the reduced result is stored: no JobStore.
    sink = ReductionSink(as_reduction(reduce), None if store is None else Path(store),
                         overwrite)
    return run(model, inputs, req, reduce_to=sink)


def _check_arguments(model: Any, block_size: Any, causal: Any, strategy: Any,
                     on_nonfinite: Any, dtype: Any, client: Any) -> None:
    """Refuse malformed options before anything is read, created or imported."""
    check_choice("causal", causal, CAUSAL_CHOICES)
    check_choice("strategy", strategy, STRATEGY_CHOICES)
    check_choice("on_nonfinite", on_nonfinite, NONFINITE_CHOICES)
    check_choice("dtype", dtype, DTYPES)
    if client is not None:
        from .run.dask import check_client

        check_client(client)
    if not callable(model):
        raise InputError(f"model must be a Keras model or a callable, got {type(model).__name__}.")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size < 1):
        raise InputError(f"block_size must be a positive int (output steps per block), got "
                         f"{block_size!r}.")
