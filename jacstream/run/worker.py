"""The dask worker side of a distributed run: a task computes and writes one block, or the
blocks of one slab of examples in order (a strategy that sweeps in time).

Each worker process loads the model once (from ``.keras`` bytes, or cloudpickle
for plain callables), prepares it as the client did and builds the block
function from the client's validated, frozen spec
(:func:`jacstream.engine.build.from_spec`): the same strategy, implementation
and shape mode as a local run. Blocks go through the same
:func:`~jacstream.run.blocks.checked_blocks` as a local run and are written as
whole chunks straight into the shared store. Each worker computes one block at
a time (a process-wide lock), so the memory budget of the plan holds per
worker process. The worker reaches TensorFlow only through :mod:`jacstream.engine`.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .._memory import current_rss, release_free_memory_above
from ..errors import JacstreamError, StoreWriteError
from ..planning import Block, Plan
from ..store import JobStore
from .blocks import Checked, checked_blocks

__all__ = ["run_block", "run_slab"]

# Loaded models kept per worker process (a worker may serve a few jobs in turn).
_CACHE_SIZE = 2


@dataclass
class _WorkerModel:
    fn: Any               # the block function, built from the client's spec
    setup_seconds: float  # loading, preparing and tracing
    rss: int = 0          # resident memory once it was set up


@dataclass
class _WorkerRun:
    plan: Plan
    store: JobStore
    inputs: Any


# Per worker process. Models are kept across runs (a resumed or repeated job
# does not trace again); runs only hold the open store.
_MODELS: OrderedDict[str, _WorkerModel] = OrderedDict()
_RUNS: OrderedDict[str, _WorkerRun] = OrderedDict()
# One block at a time per worker process: the plan's memory budget is per process.
_LOCK = threading.Lock()


def _remember(cache: OrderedDict[str, Any], key: str, value: Any) -> None:
    cache[key] = value
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def _worker_model(spec: dict[str, Any], model: tuple[str, bytes]) -> tuple[_WorkerModel, bool]:
    """This process's model for ``spec``: loaded, prepared and built once. (model, was cached)."""
    key = spec["model_token"]
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key], True
    t0 = time.perf_counter()
    from ..engine import build, devices, io, models

    dev = devices.resolve_device(spec["device"])
    # The same steps as the client (and a local run): identical ops, identical bits.
    prepared = models.prepare_model(io.load_payload(*model), spec["sample"], dev)
    fn = build.from_spec(prepared.call, replace(spec["function"], device=dev))
    wm = _WorkerModel(fn, time.perf_counter() - t0, current_rss())
    _remember(_MODELS, key, wm)
    return wm, False


def _worker_run(spec: dict[str, Any]) -> _WorkerRun:
    run = _RUNS.get(spec["run"])
    if run is None:
        run = _WorkerRun(Plan.from_dict(spec["plan"]), JobStore.open(spec["store"], mode="r+"),
                         spec["inputs"])
        _remember(_RUNS, spec["run"], run)
    return run


def worker_name() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _new_meta(index: int) -> dict[str, Any]:
    return {"index": index, "worker": worker_name(), "skipped": False, "setup_seconds": 0.0,
            "traces": 0}


def run_block(index: int, slab: np.ndarray | None, *, spec: dict[str, Any],
              model: tuple[str, bytes]) -> dict[str, Any]:
    """Task body: compute block ``index`` and write it; return only small metadata.

    A :class:`JacstreamError` that would recur on any worker (bad model
    output, NaN with ``on_nonfinite="raise"``) is returned, not raised, so
    dask does not retry it; other errors are raised and retried.
    """
    (meta,) = run_slab([index], slab, spec=spec, model=model)
    return meta


def run_slab(indices: list[int], slab: np.ndarray | None, *, spec: dict[str, Any],
             model: tuple[str, bytes]) -> list[dict[str, Any]]:
    """Task body: compute blocks ``indices`` (one slab of examples) in order, writing each.

    The blocks go through one call of :func:`checked_blocks`, so a strategy that
    sweeps in time sweeps the slab once. Each block is written (chunks, then its
    completion marker) as soon as it is computed, before the next is computed:
    a task killed midway keeps its finished blocks, and a retried task skips the
    blocks marked done. Returns one metadata dict per block, in order; a
    :class:`JacstreamError` (which would recur on any worker) ends the list as
    the ``"error"`` of the block it happened on, so dask does not retry it;
    other errors are raised (and retried).
    """
    metas = [_new_meta(i) for i in indices]
    try:
        with _LOCK:
            run = _worker_run(spec)
            todo = []
            for meta in metas:
                # done by another attempt or run: nothing to redo
                meta["skipped"] = run.store.is_done(meta["index"])
                if not meta["skipped"]:
                    todo.append(meta)
            if not todo:
                return metas
            wm, cached = _worker_model(spec, model)
            todo[0]["setup_seconds"] = 0.0 if cached else round(wm.setup_seconds, 3)
            last = _compute_and_write(run, wm, spec, slab, todo)
        _write(run, wm, *last)   # the lock is free while the last block is written
        return metas
    except StoreWriteError:
        raise   # may be transient (a network filesystem): let dask retry it
    except JacstreamError as e:
        failed = next((m for m in metas if not m["skipped"] and "write_seconds" not in m),
                      metas[-1])
        failed["error"] = e
        return metas[:metas.index(failed) + 1]


def _compute_and_write(run: _WorkerRun, wm: _WorkerModel, spec: dict[str, Any],
                       slab: np.ndarray | None,
                       todo: list[dict[str, Any]]) -> tuple[Checked, dict[str, Any]]:
    """Compute the blocks of ``todo`` in order, writing each but the last; the last
    (computed, not yet written) and its metadata."""
    def read(block: Block) -> np.ndarray:
        e0, e1 = block.examples
        return slab if slab is not None else np.asarray(run.inputs[e0:e1])

    blocks = [run.plan.block(m["index"]) for m in todo]
    items = checked_blocks(wm.fn, run.plan, blocks, read, t_out=spec["t_out"],
                           on_nonfinite=spec["on_nonfinite"],
                           where=f" on dask worker {todo[0]['worker']}")
    last: tuple[Checked, dict[str, Any]] | None = None
    for item, meta in zip(items, todo, strict=True):
        meta["compute_seconds"] = item.seconds
        meta["traces"] = wm.fn.traces
        if item.nonfinite is not None:
            meta["nonfinite"] = item.nonfinite
        if meta is todo[-1]:
            last = (item, meta)
        else:
            _write(run, wm, item, meta)   # before the next block is computed
        del item
    assert last is not None
    return last


def _write(run: _WorkerRun, wm: _WorkerModel, item: Checked, meta: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    run.store.write_block(run.plan, item.block, item.data)
    meta["write_seconds"] = time.perf_counter() - t0
    release_free_memory_above(wm.rss + run.plan.estimated_peak)   # see run_local
