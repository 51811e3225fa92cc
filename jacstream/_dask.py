"""Distributed execution: the plan's blocks as tasks on a dask.distributed cluster.

The client (the process that calls :func:`jacstream.jacobian`) validates,
plans and creates the store exactly as a local run does, then submits one
task per block not yet done. Each worker process loads the model once (from
``.keras`` bytes, or cloudpickle for plain callables), prepares it and traces
its :class:`~jacstream._tf.BlockFunction` once, then computes its blocks and
writes them as whole chunks straight into the shared store with
:meth:`JobStore.write_block` (chunks fsynced, then the completion marker).
Tasks return a few numbers, so the client never holds Jacobian data.

The completion markers are the local ones, so a distributed run can be
resumed locally and the other way round. A worker that dies mid-block leaves
that block unmarked; the scheduler runs the task again elsewhere, and a task
whose block is already marked returns at once. Each worker computes one block
at a time (a process-wide lock), so the memory budget of the plan holds per
worker process, as it does for a local run. No TensorFlow is imported here
in the client; workers import it through :mod:`jacstream._tf`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ._execute import RunStats, _check_shapes, _report_nonfinite, compute_block
from ._memory import current_rss, release_free_memory_above
from ._plan import Block, Plan, format_bytes
from ._store import DONE_DIR, JobStore
from .errors import (
    BudgetError,
    ClusterError,
    InputError,
    JacstreamError,
    ModelError,
    NonFiniteError,
    StoreError,
    StoreWriteError,
)

__all__ = ["ClusterError", "DaskRunStats", "check_client", "connect", "default_worker_budget",
           "run_dask"]

KEY_PREFIX = "jacstream-block"
# Loaded models kept per worker process (a worker may serve a few jobs in turn).
_CACHE_SIZE = 2


# =========================================================================== client side
def connect(address: str, timeout: float = 30.0) -> Any:
    """A ``dask.distributed.Client`` connected to the scheduler at ``address``.

    Parameters
    ----------
    address : str
        Scheduler address, e.g. ``"tcp://10.0.0.5:8786"``.
    timeout : float
        Seconds to wait for the scheduler.

    Examples
    --------
    >>> client = connect("tcp://127.0.0.1:8786")      # doctest: +SKIP
    >>> jacstream.jacobian(model, x, "/shared/jac.zarr", client=client)  # doctest: +SKIP
    """
    from distributed import Client

    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as e:
        raise ClusterError(
            f"cannot reach a dask scheduler at {address!r} within {timeout:g} s ({e}). Start "
            "one with `dask scheduler` (and workers with `dask worker ADDRESS`), and pass the "
            "address it prints, e.g. tcp://10.0.0.5:8786.") from None


def _workers(client: Any) -> dict[str, dict[str, Any]]:
    return dict(client.scheduler_info(n_workers=-1).get("workers", {}))


def default_worker_budget(client: Any) -> int | None:
    """Default per-worker budget: 2 GiB, or a quarter of the smallest worker memory limit.

    ``None`` when no worker reports a memory limit (the caller then uses the
    local default).
    """
    limits = [int(w.get("memory_limit") or 0) for w in _workers(client).values()]
    limits = [m for m in limits if m > 0]
    if not limits:
        return None
    return int(min(2 * 2**30, min(limits) // 4))


@dataclass
class DaskRunStats(RunStats):
    """:class:`RunStats` plus what each worker process did."""

    scheduler: str = ""
    # "host:pid" -> {"blocks": n, "traces": max traces seen, "setup_seconds": s}
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run_info(self) -> dict[str, Any]:
        """Entries for the store's run record."""
        return {"executor": "dask", "scheduler": self.scheduler,
                "workers": {k: dict(v) for k, v in self.workers.items()},
                "traces": max((w["traces"] for w in self.workers.values()), default=0)}


def check_client(client: Any) -> None:
    """Raise InputError unless ``client`` is a synchronous ``dask.distributed.Client``."""
    from distributed import Client

    if not isinstance(client, Client):
        raise InputError(f"client must be a dask.distributed.Client, got "
                         f"{type(client).__name__}. Connect with "
                         "dask.distributed.Client('tcp://scheduler:8786').")
    if getattr(client, "asynchronous", False):
        raise InputError("client is asynchronous; jacstream needs a synchronous "
                         "dask.distributed.Client.")


def _model_payload(model: Any) -> tuple[str, bytes]:
    """Serialise the original model: ``.keras`` bytes, else cloudpickle.

    The kind is ``"keras"`` (loaded in Keras' safe mode) or, for a model with
    Lambda layers, ``"keras-lambda"``: safe mode refuses the Python code of a
    Lambda, and these bytes come from the caller's own in-memory model, not
    from an untrusted file, so the workers load them with ``safe_mode=False``.
    """
    import keras

    if isinstance(model, keras.Model):
        with tempfile.TemporaryDirectory(prefix="jacstream-") as d:
            path = os.path.join(d, "model.keras")
            try:
                model.save(path)
                with open(path, "rb") as f:
                    payload = f.read()
                config = json.dumps(model.get_config(), default=str)
            except Exception:
                pass  # e.g. a subclassed model without get_config: try cloudpickle
            else:
                lam = '"class_name": "Lambda"' in config
                return ("keras-lambda" if lam else "keras"), payload
    import cloudpickle

    try:
        return "pickle", cloudpickle.dumps(model)
    except Exception as e:
        raise ModelError(
            f"cannot send the model to the dask workers: it is neither savable as .keras nor "
            f"picklable ({type(e).__name__}: {e}). Give it a get_config() (Keras), or make it "
            "a function of module-level objects that cloudpickle can serialise.") from None


def _inputs_reference(inputs: Any) -> Any:
    """A zarr array on a filesystem store can be read by the workers themselves."""
    try:
        import zarr
        from zarr.storage import LocalStore
    except ImportError:  # pragma: no cover - zarr is a dependency
        return None
    if isinstance(inputs, zarr.Array) and isinstance(inputs.store, LocalStore):
        return inputs
    return None


def _preflight(client: Any, plan: Plan, path: Path) -> None:
    workers = _workers(client)
    if not workers:
        try:
            client.wait_for_workers(1, timeout=30)
        except Exception:
            raise ClusterError(
                f"the dask cluster at {client.scheduler.address} has no workers (waited 30 s). "
                "Start some with `dask worker SCHEDULER_ADDRESS`.") from None
        workers = _workers(client)
    for addr, w in workers.items():
        limit = int(w.get("memory_limit") or 0)
        if limit and plan.estimated_peak > limit:
            raise BudgetError(
                f"a block needs about {format_bytes(plan.estimated_peak)} of working memory, "
                f"more than the memory limit of worker {addr} ({format_bytes(limit)}). Pass a "
                f"smaller memory_budget (it applies per worker) or block_size.")
    seen = client.run(os.path.isdir, str(path / DONE_DIR))
    blind = sorted(a for a, ok in seen.items() if not ok)
    if blind:
        raise StoreError(
            f"the store {str(path)!r} is not visible on the dask worker(s) {blind}. Workers "
            "write blocks into the store directly: put it on a filesystem every worker "
            "mounts at the same path (e.g. NFS), or use a local cluster.")


def _model_token(job: dict[str, Any], plan: Plan, sample: np.ndarray, device: str | None,
                 static: bool, t_out: int) -> str:
    """Names a loaded, traced model in the workers' cache: same key, same block function."""
    h = hashlib.sha256()
    h.update(json.dumps([job["model"], plan.strategy, plan.f_in, plan.f_out, plan.block_size,
                         plan.causal, t_out, device, static], default=str).encode())
    h.update(np.ascontiguousarray(sample).tobytes())
    return h.hexdigest()[:16]


def _payload(value: Any) -> Any:
    return value


def _constant(client: Any, value: Any, key: str) -> Any:
    """A future of ``value`` that the scheduler can recompute (its value is in the graph)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ll]arge graph.*")
        return client.submit(_payload, value, key=key, pure=False)


def run_dask(plan: Plan, store: JobStore, inputs: Any, model: Any, *, client: Any,
             job: dict[str, Any], device: str | None, sample: np.ndarray, static: bool,
             t_out: int, progress: bool = True, on_nonfinite: str = "raise",
             on_block: Callable[[Block], None] | None = None,
             retries: int = 2) -> DaskRunStats:
    """Carry out ``plan`` on a dask cluster, skipping blocks the store records as done.

    Parameters
    ----------
    plan, store : Plan, JobStore
        As made by :func:`jacstream.jacobian`; ``store`` must be on a
        filesystem every worker sees at the same path.
    inputs : array-like
        The ``(batch, T_in, F_in)`` inputs. A zarr array on a local/network
        filesystem is read by the workers; anything else is sent once, one
        slab of examples per example block.
    model : keras.Model or callable
        The original model (the workers prepare it as a local run does).
    client : dask.distributed.Client
        A connected, synchronous client.
    job, device, sample, static, t_out
        The job's identity (model and inputs fingerprints...), the caller's
        device request, the sample the client prepared the model on, whether
        its block function runs with static shapes, and the model's output
        length.
    retries : int
        Extra attempts for a task that raised an unexpected error (a task whose
        worker died is rescheduled by dask regardless).

    Returns
    -------
    DaskRunStats
    """
    check_client(client)
    stats = DaskRunStats(scheduler=str(client.scheduler.address))
    t_start = time.perf_counter()
    path = store.path.resolve()
    done = store.done_blocks()
    pending = [b for b in plan.blocks if b.index not in done]
    stats.skipped_blocks = plan.n_blocks - len(pending)
    if not pending:
        return stats
    _preflight(client, plan, path)

    kind, payload = _model_payload(model)
    ref = _inputs_reference(inputs)
    run_id = uuid.uuid4().hex[:8]
    spec = {
        "model_token": _model_token(job, plan, sample, device, static, t_out), "run": run_id,
        "store": str(path), "plan": plan.to_dict(), "device": device,
        "sample": np.ascontiguousarray(sample), "static": bool(static), "t_out": int(t_out),
        "on_nonfinite": on_nonfinite, "inputs": ref,
    }
    # The model, the spec and the input slabs enter the cluster once, as tasks that
    # return them: tasks depend on them by future, and unlike scattered data the
    # scheduler can recompute them if every worker holding them dies.
    model_f = _constant(client, (kind, payload), f"jacstream-model-{run_id}")
    spec_f = _constant(client, spec, f"jacstream-spec-{run_id}")
    del payload
    slab_fs: dict[int, Any] = {}
    if ref is None:
        for e0, e1 in sorted({b.examples for b in pending}):
            slab = np.ascontiguousarray(np.asarray(inputs[e0:e1]))
            slab_fs[e0] = _constant(client, slab, f"jacstream-inputs-{e0:08d}-{run_id}")
    keys = [f"{KEY_PREFIX}-{b.index:08d}-{run_id}" for b in pending]
    futures = client.map(_run_block, [b.index for b in pending],
                         [slab_fs.get(b.examples[0]) for b in pending],
                         key=keys, spec=spec_f, model=model_f, retries=retries, pure=False)
    from distributed import as_completed

    remaining = dict(zip(keys, futures, strict=True))
    del futures
    bar = tqdm(total=plan.n_blocks, initial=stats.skipped_blocks, unit="block",
               desc="jacobian (dask)", disable=None if progress else True,
               dynamic_ncols=True, file=sys.stderr)
    try:
        for fut in as_completed(list(remaining.values())):
            try:
                meta = fut.result()
            except Exception as e:
                _add_context(e, fut.key)
                raise
            # Drop the finished future: a result lost with its worker is then not recomputed.
            del remaining[fut.key]
            if "error" in meta:
                raise meta["error"]
            _account(stats, meta, plan, on_nonfinite)
            bar.update(1)
            if on_block is not None:
                on_block(plan.block(meta["index"]))
    except BaseException as exc:
        bar.close()
        client.cancel(list(remaining.values()))
        if isinstance(exc, KeyboardInterrupt):
            print(f"\njacstream: interrupted; {len(store.done_blocks())} of {plan.n_blocks} "
                  f"blocks are safely in {str(store.path)!r}. Call jacstream.jacobian() again "
                  "with the same arguments (with or without client=) to resume. Blocks already "
                  "running on workers finish and are kept.", file=sys.stderr)
        raise
    finally:
        del remaining, model_f, spec_f, slab_fs
    bar.close()
    stats.wall_seconds = time.perf_counter() - t_start
    return stats


def _add_context(e: BaseException, key: str) -> None:
    if not hasattr(e, "add_note"):
        return
    note = f"jacstream: block {int(key.split('-')[2])} failed on the dask cluster"
    if type(e).__name__ == "KilledWorker":
        note += ("; every worker that ran it died (out of memory? lower memory_budget or "
                 "block_size, or raise the workers' memory limit)")
    e.add_note(note + ". Finished blocks are kept: call jacstream.jacobian() again to resume.")


def _account(stats: DaskRunStats, meta: dict[str, Any], plan: Plan, on_nonfinite: str) -> None:
    w = stats.workers.setdefault(meta["worker"], {"blocks": 0, "traces": 0,
                                                  "setup_seconds": 0.0})
    w["traces"] = max(w["traces"], meta["traces"])
    w["setup_seconds"] = round(w["setup_seconds"] + meta["setup_seconds"], 3)
    if meta["skipped"]:
        stats.skipped_blocks += 1
        return
    w["blocks"] += 1
    stats.computed_blocks.append(meta["index"])
    stats.compute_seconds += meta["compute_seconds"]
    stats.write_seconds += meta["write_seconds"]
    if meta.get("nonfinite"):
        stats.nonfinite_blocks.append(meta["index"])
        if on_nonfinite == "warn":
            warnings.warn(meta["nonfinite"], RuntimeWarning, stacklevel=4)


# =========================================================================== worker side
@dataclass
class _WorkerModel:
    fn: Any               # the traced BlockFunction
    setup_seconds: float  # loading, preparing and tracing
    rss: int = 0          # resident memory once it was set up


@dataclass
class _WorkerRun:
    plan: Plan
    store: JobStore
    out_steps: np.ndarray
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


def _load_model(kind: str, payload: bytes) -> Any:
    if kind == "pickle":
        import cloudpickle

        return cloudpickle.loads(payload)
    import keras

    with tempfile.TemporaryDirectory(prefix="jacstream-") as d:
        path = os.path.join(d, "model.keras")
        with open(path, "wb") as f:
            f.write(payload)
        try:
            return keras.models.load_model(path, safe_mode=kind != "keras-lambda")
        except Exception as e:
            raise ModelError(
                f"the dask worker could not load the model from its .keras file "
                f"({type(e).__name__}: {e}). Custom layers must be importable on the workers "
                "and registered with keras.saving.register_keras_serializable().") from None


def _worker_model(spec: dict[str, Any], model: tuple[str, bytes]) -> tuple[_WorkerModel, bool]:
    """This process's model for ``spec``: loaded, prepared and traced once. (model, was cached)."""
    key = spec["model_token"]
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key], True
    t0 = time.perf_counter()
    from . import _tf

    plan = Plan.from_dict(spec["plan"])
    dev = _tf.resolve_device(spec["device"])
    sample = spec["sample"]
    # The same steps as the client (and a local run): identical ops, identical bits.
    loaded = _load_model(*model)
    prepared = _tf.prepare_model(loaded, sample, dev)
    if plan.strategy == "sensitivity":
        from . import _sensitivity

        # The same decisions as the client's (chunk length, propagators) from the same
        # plan: the same computation, so the same bits as a local run.
        fn: Any = _sensitivity.build(loaded, prepared.call, plan.f_in, plan.f_out, dev, plan.batch,
                                plan.t_in)
    else:
        fn = _tf.BlockFunction(prepared.call, plan.strategy, plan.f_in, plan.f_out, dev)
    # The client validated the traced signature; every block's shapes are checked again.
    fn.static = bool(spec["static"])
    fn.static_block = plan.block_size
    wm = _WorkerModel(fn, time.perf_counter() - t0, current_rss())
    _remember(_MODELS, key, wm)
    return wm, False


def _worker_run(spec: dict[str, Any]) -> _WorkerRun:
    run = _RUNS.get(spec["run"])
    if run is None:
        plan = Plan.from_dict(spec["plan"])
        run = _WorkerRun(plan, JobStore.open(spec["store"], mode="r+"),
                         np.asarray(plan.out_steps, dtype=np.int32), spec["inputs"])
        _remember(_RUNS, spec["run"], run)
    return run


def _worker_name() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _run_block(index: int, slab: np.ndarray | None, *, spec: dict[str, Any],
               model: tuple[str, bytes]) -> dict[str, Any]:
    """Task body: compute block ``index`` and write it; return only small metadata.

    A :class:`JacstreamError` that would recur on any worker (bad model
    output, NaN with ``on_nonfinite="raise"``) is returned, not raised, so
    dask does not retry it; other errors are raised and retried.
    """
    meta: dict[str, Any] = {"index": index, "worker": _worker_name(), "skipped": False,
                            "setup_seconds": 0.0, "traces": 0}
    try:
        with _LOCK:
            run = _worker_run(spec)
            if (run.store.path / DONE_DIR / f"{index:08d}.done").exists():
                meta["skipped"] = True
                return meta   # done by another attempt or run: nothing to redo
            wm, cached = _worker_model(spec, model)
            meta["setup_seconds"] = 0.0 if cached else round(wm.setup_seconds, 3)
            block = run.plan.block(index)
            e0, e1 = block.examples
            x = slab if slab is not None else np.asarray(run.inputs[e0:e1])
            t0 = time.perf_counter()
            data, yshape, fed = compute_block(wm.fn, run.plan, block, x, run.out_steps,
                                              f" on dask worker {meta['worker']}")
            meta["compute_seconds"] = time.perf_counter() - t0
            meta["traces"] = wm.fn.traces
        _check_shapes(run.plan, block, data, yshape, fed, spec["t_out"])
        if spec["on_nonfinite"] != "ignore" and not np.isfinite(data).all():
            try:
                _report_nonfinite(run.plan, block, data, "raise", RunStats(), x)
            except NonFiniteError as e:
                if spec["on_nonfinite"] == "raise":
                    raise
                meta["nonfinite"] = str(e)
        t0 = time.perf_counter()
        run.store.write_block(run.plan, block, data)
        meta["write_seconds"] = time.perf_counter() - t0
        del data
        release_free_memory_above(wm.rss + run.plan.estimated_peak)   # see run_local
        return meta
    except StoreWriteError:
        raise   # may be transient (a network filesystem): let dask retry it
    except JacstreamError as e:
        meta["error"] = e
        return meta
