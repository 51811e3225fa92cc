"""Distributed execution: the plan's blocks as tasks on a dask.distributed cluster.

The client (the process that calls :func:`jacstream.jacobian`) validates,
plans and creates the store exactly as a local run does, then submits one
task per block not yet done, or, for a strategy that sweeps in time
(``sensitivity``), one task per slab of examples that computes the slab's
pending blocks in order with one sweep. Each worker process loads the model
once (from ``.keras`` bytes, or cloudpickle for plain callables), prepares it and traces
the block function from the spec the client validated (:mod:`jacstream.run.worker`),
then computes its blocks and writes them as whole chunks straight into the
shared store with :meth:`JobStore.write_block` (chunks flushed to disk, then the
completion marker), each block as soon as it is computed.
Tasks return a few numbers per block, so the client never holds Jacobian data;
the progress bar follows the completion markers as they appear.

The completion markers are the local ones, so a distributed run can be
resumed locally and the other way round. A worker that dies mid-block leaves
that block unmarked; the scheduler runs the task again elsewhere, and a task
skips the blocks already marked (a retried slab's task computes only the
blocks its first attempt did not finish). Each worker computes one block at a
time (a process-wide lock), so the memory budget of the plan holds per worker
process, as it does for a local run. Models reach the workers through
:mod:`jacstream.engine.io`; nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import events
from ..errors import BudgetError, ClusterError, InputError, StoreError
from ..planning import Block, Plan, format_bytes
from ..planning.strategies import REGISTRY
from ..store.jobstore import JobStore, done_dir
from .blocks import RunStats
from .progress import BlockBar, say_interrupted
from .worker import run_block, run_slab

__all__ = ["ClusterError", "DaskRunStats", "check_client", "connect", "default_worker_budget",
           "run_dask"]

# Task keys: jacstream-block-<block>-<run> (one block), jacstream-slab-<first example>-<run>
# (the pending blocks of one slab of examples, for a strategy that sweeps in time).
BLOCK_KEY = "jacstream-block"
SLAB_KEY = "jacstream-slab"
# While tasks run, the client reads the store's completion markers this often (progress).
POLL_SECONDS = 0.5


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


def _inputs_reference(inputs: Any) -> Any:
    """A zarr array on a filesystem store can be read by the workers themselves."""
    import zarr
    from zarr.storage import LocalStore

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
    seen = client.run(os.path.isdir, str(done_dir(path)))
    blind = sorted(a for a, ok in seen.items() if not ok)
    if blind:
        raise StoreError(
            f"the store {str(path)!r} is not visible on the dask worker(s) {blind}. Workers "
            "write blocks into the store directly: put it on a filesystem every worker "
            "mounts at the same path (e.g. NFS), or use a local cluster.")


def _model_token(job: dict[str, Any], fn_spec: Any, sample: np.ndarray, device: str | None,
                 t_out: int) -> str:
    """Names a loaded model and its block function in the workers' cache: same key, same
    function."""
    h = hashlib.sha256()
    h.update(json.dumps([job["model"], asdict(fn_spec), t_out, device], default=str).encode())
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
             job: dict[str, Any], device: str | None, sample: np.ndarray, fn_spec: Any,
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
    job, device, sample, fn_spec, t_out
        The job's identity (model and inputs fingerprints...), the caller's
        device request, the sample the client prepared the model on, the
        frozen spec of the block function the client validated and bound to
        ``plan``, and the model's output length.
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
    pending = [b for b in plan.blocks if b.index not in store.done_blocks()]
    stats.skipped_blocks = plan.n_blocks - len(pending)
    if not pending:
        return stats
    path = store.path.resolve()
    _preflight(client, plan, path)
    from ..engine.io import model_payload

    ref = _inputs_reference(inputs)
    spec = {
        "model_token": _model_token(job, fn_spec, sample, device, t_out),
        "run": uuid.uuid4().hex[:8], "store": str(path), "plan": plan.to_dict(),
        "device": device, "sample": np.ascontiguousarray(sample), "function": fn_spec,
        "t_out": int(t_out), "on_nonfinite": on_nonfinite, "inputs": ref,
    }
    tasks = _tasks(plan, pending, spec["run"])
    with events.phase("blocks", f"{len(pending)} of {plan.n_blocks} blocks on dask"):
        futures, inputs_fs = _submit(client, spec, model_payload(model), tasks, inputs, ref,
                                     retries)
        _collect(client, futures, tasks, stats, store, plan, progress, on_nonfinite,
                 on_block)
        del inputs_fs
    stats.wall_seconds = time.perf_counter() - t_start
    return stats


def _tasks(plan: Plan, pending: list[Block], run_id: str) -> dict[str, list[Block]]:
    """``{key: blocks}``: one task per pending block, or, for a strategy that sweeps in
    time, one per slab of examples (its pending blocks in order: one sweep)."""
    info = REGISTRY.get(plan.strategy)
    if info is None or not info.sweeps:
        return {f"{BLOCK_KEY}-{b.index:08d}-{run_id}": [b] for b in pending}
    slabs: dict[tuple[int, int], list[Block]] = {}
    for b in pending:   # in plan order: by slab, then by output steps
        slabs.setdefault(b.examples, []).append(b)
    return {f"{SLAB_KEY}-{e0:08d}-{run_id}": blocks for (e0, _), blocks in slabs.items()}


def _submit(client: Any, spec: dict[str, Any], payload: tuple[str, bytes],
            tasks: dict[str, list[Block]], inputs: Any, ref: Any,
            retries: int) -> tuple[dict[str, Any], list[Any]]:
    """Submit ``tasks`` (see :func:`_tasks`): ``{key: future}``, and the futures of what
    they read (held until the run ends)."""
    run_id = spec["run"]
    # The model, the spec and the input slabs enter the cluster once, as tasks that
    # return them: tasks depend on them by future, and unlike scattered data the
    # scheduler can recompute them if every worker holding them dies.
    model_f = _constant(client, payload, f"jacstream-model-{run_id}")
    spec_f = _constant(client, spec, f"jacstream-spec-{run_id}")
    slab_fs: dict[int, Any] = {}
    if ref is None:
        for e0, e1 in sorted({bs[0].examples for bs in tasks.values()}):
            slab = np.ascontiguousarray(np.asarray(inputs[e0:e1]))
            slab_fs[e0] = _constant(client, slab, f"jacstream-inputs-{e0:08d}-{run_id}")
    keys = list(tasks)
    slabs = [slab_fs.get(tasks[k][0].examples[0]) for k in keys]
    per_block = all(k.startswith(BLOCK_KEY) for k in keys)
    body, what = ((run_block, [tasks[k][0].index for k in keys]) if per_block else
                  (run_slab, [[b.index for b in tasks[k]] for k in keys]))
    futures = client.map(body, what, slabs, key=keys, spec=spec_f, model=model_f,
                         retries=retries, pure=False)
    return dict(zip(keys, futures, strict=True)), [model_f, spec_f, *slab_fs.values()]


def _collect(client: Any, remaining: dict[str, Any], tasks: dict[str, list[Block]],
             stats: DaskRunStats, store: JobStore, plan: Plan, progress: bool,
             on_nonfinite: str, on_block: Callable[[Block], None] | None) -> None:
    """Wait for the tasks, account for each as it finishes; cancel the rest on an error.

    While waiting, the store's completion markers are read every
    :data:`POLL_SECONDS`, so the bar (and ``on_block``) follows the blocks a slab's
    task has written before the task returns; each block is announced once.
    """
    from distributed import wait

    mine = {b.index for blocks in tasks.values() for b in blocks}
    bar = BlockBar(plan, {b.index for b in plan.blocks} - mine, "jacobian (dask)", progress)
    announced: set[int] = set()

    def finished(indices: Iterable[int]) -> None:
        for i in sorted(set(indices) & mine - announced):
            announced.add(i)
            bar.advance(plan.block(i))
            if on_block is not None:
                on_block(plan.block(i))

    try:
        while remaining:
            try:
                done = wait(list(remaining.values()), timeout=POLL_SECONDS,
                            return_when="FIRST_COMPLETED").done
            except TimeoutError:
                done = set()
            finished(store.done_blocks())
            for fut in done:
                try:
                    result = fut.result()
                except Exception as e:
                    _add_context(e, tasks[fut.key])
                    raise
                # Drop the finished future: a result lost with its worker is then not
                # recomputed.
                del remaining[fut.key]
                for meta in result if isinstance(result, list) else [result]:
                    if "error" in meta:
                        raise meta["error"]
                    _account(stats, meta, plan, on_nonfinite)
                    finished([meta["index"]])
    except BaseException as exc:
        client.cancel(list(remaining.values()))
        if isinstance(exc, KeyboardInterrupt):
            say_interrupted(exc, f"{len(store.done_blocks())} of {plan.n_blocks} blocks are "
                            f"safely in {str(store.path)!r}. Call jacstream.jacobian() again "
                            "with the same arguments (with or without client=) to resume. "
                            "Blocks already running on workers finish and are kept.")
        raise
    finally:
        bar.close()
        remaining.clear()


def _add_context(e: BaseException, blocks: list[Block]) -> None:
    if not hasattr(e, "add_note"):
        return
    if len(blocks) == 1:
        what = f"block {blocks[0].index}"
    else:
        e0, e1 = blocks[0].examples
        what = (f"the task for examples {e0}..{e1 - 1} (blocks "
                f"{', '.join(str(b.index) for b in blocks)})")
    note = f"jacstream: {what} failed on the dask cluster"
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
