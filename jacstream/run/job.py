"""One job: from a validated request to a finished (or resumed) store, or a reduced result.

The one orchestrator. In order: the target (a new store, a store to resume or
to replace, or a streaming reduction), the engine's checks of the model, the
job's identity, the plan (stored, fixed or chosen by ``strategy="auto"``), then
the blocks, locally or on dask, and the run record.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._memory import PeakTracker, current_rss
from ..errors import InputError, ModelError, ReadOnlyStoreError, StoreMismatchError
from ..planning import Plan, normalize_out_steps
from ..planning.strategies import REGISTRY
from ..store import Jacobian, JobStore, rules
from ..store.sink import Sink
from . import collector
from .budget import default_memory_budget
from .candidates import Candidates
from .inputs import Side, as_inputs, check_side, split_inputs
from .progress import phase_lines
from .record import run_record

__all__ = ["Request", "run"]


@dataclass(frozen=True)
class Request:
    """The options of one :func:`jacstream.jacobian` call (see there), already checked."""

    store: str | os.PathLike[str] | None
    out_steps: Any = None
    block_size: int | None = None
    memory_budget: int | None = None
    examples_per_block: int | None = None
    causal: bool | str = "auto"
    strategy: str = "auto"
    device: str | None = None
    dtype: str = "float32"
    overwrite: bool = False
    progress: bool = True
    on_nonfinite: str = "raise"
    in_chunk: int | None = None
    on_block: Callable[[Any], None] | None = None
    client: Any = None
    wrt: Any = None

    @property
    def path(self) -> Path | None:
        return None if self.store is None else Path(self.store)


@dataclass
class _Job:
    """What the checks and the identity established, passed between the steps below."""

    req: Request
    x: Any
    dev: str
    m: Any
    cands: Candidates
    t_out: int
    job: dict[str, Any]
    reason: str
    t_call: float
    rss0: int
    fn: Any = None
    plan: Plan | None = None
    choice: dict[str, Any] = field(default_factory=dict)
    precomputed: dict[int, Any] = field(default_factory=dict)


def run(model: Any, inputs: Any, req: Request, *, reduce_to: Any = None,
        blocks_to: Sink | None = None) -> Any:
    """Carry out the job ``req`` asks for; a :class:`~jacstream.store.result.Jacobian`.

    ``reduce_to``: a streaming reduction's sink (:class:`jacstream.analysis.streaming.
    ReductionSink`): then no store is made and its result is returned. ``blocks_to``:
    where blocks go instead of the store (a :class:`~jacstream.store.sink.NullSink`
    for benchmarks); the store still holds the job's metadata and run record. With
    ``req.progress``, a line on stderr says what each phase before the blocks is doing.
    """
    # the objects from before the job out of the collector's way; a line per phase
    with collector.frozen(), phase_lines(req.progress):
        return _locked(model, inputs, req, reduce_to, blocks_to)


def _locked(model: Any, inputs: Any, req: Request, reduce_to: Any,
            blocks_to: Sink | None) -> Any:
    t_call, rss0 = time.perf_counter(), current_rss()
    # The writer lock first: a second writer of a store is refused before any work.
    existing = None if reduce_to is not None else _existing_store(req)
    try:
        return _run(model, inputs, req, existing, reduce_to, blocks_to, t_call, rss0)
    finally:
        if existing is not None:
            existing.unlock()


def _run(model: Any, inputs: Any, req: Request, existing: JobStore | None, reduce_to: Any,
         blocks_to: Sink | None, t_call: float, rss0: int) -> Any:
    """:func:`run` once the store being resumed or replaced (if any) is locked."""
    model, x, side = _model_and_inputs(model, inputs, req)
    resuming = existing is not None and not req.overwrite
    fixed = existing.plan.strategy if resuming and existing is not None else (
        None if req.strategy == "auto" else req.strategy)
    if reduce_to is not None:
        fixed = _reverse_mode_strategy(fixed)
    j = _identify(model, x, req, fixed, t_call, rss0, side)
    if resuming and existing is not None:
        return _resume(j, model, existing, blocks_to)
    _new_plan(j, model, fixed)
    assert j.plan is not None
    if reduce_to is not None:
        return _reduce(j, reduce_to)
    assert req.path is not None
    js = JobStore.create(req.path, j.plan, {**j.job, "causal_reason": j.reason,
                                            "model_output": _model_output(j.m),
                                            "model_rewrites": j.m.prepared.rewritten,
                                            "device": j.dev, "strategy_choice": j.choice},
                         overwrite=req.overwrite)
    try:
        return _execute(j, model, js, blocks_to)
    finally:
        js.unlock()


def _model_output(m: Any) -> str:
    """What the model returns, and how the Jacobian's axes follow from it (store metadata)."""
    if m.one_step:
        return ("(batch, features): one output step, stored as out_step 0 (the Jacobian's "
                "axis 1 has length 1)")
    return "(batch, steps, features)"


def _model_and_inputs(model: Any, inputs: Any, req: Request) -> tuple[Any, Any, Side | None]:
    """The model as a function of the input differentiated, that input (in the model's
    compute dtype), and the model's other inputs (None for a model of one input)."""
    primary, side = split_inputs(inputs, req.wrt, model)
    dtype = "float32"
    if "keras" in sys.modules:   # else the model cannot be a Keras model: no TF import yet
        from ..engine.models import compute_dtype

        dtype = compute_dtype(model)
    x = as_inputs(primary, scratch=req.store, dtype=dtype)
    if side is None:
        return model, x, None
    side = check_side(side, int(x.shape[0]), dtype)
    from ..engine.models import WithSide

    return WithSide(model, side.wrt, side.arrays, side.order, side.form), x, side


def _existing_store(req: Request) -> JobStore | None:
    """The jacstream store at the path, locked; None for a new path or an empty directory.

    Anything else there is refused, whatever ``overwrite`` says: jacstream only
    ever replaces a store it wrote itself. A store being resumed or replaced is
    locked (StoreLockedError while another process writes it); a read-only one
    is not (nothing will be written to it).
    """
    assert req.path is not None
    path = req.path
    rules.refuse_foreign(path)
    existing = JobStore.open(path, mode="r+") if JobStore.exists(path) else None
    if existing is None or req.overwrite:
        JobStore.check_creatable(path)
    if existing is not None and JobStore.writable(path):
        existing.lock()
    return existing


def _reverse_mode_strategy(fixed: str | None) -> str:
    """Streaming reductions walk blocks of output steps: the strategy must make them."""
    rows = [n for n, info in REGISTRY.items() if info.axis == "out"]
    if fixed is not None and fixed not in rows:
        raise InputError(f"reduce= needs blocks of output steps: use strategy="
                         f"{', '.join(map(repr, rows))} or 'auto', not {fixed!r}.")
    return fixed or rows[0]


def _identify(model: Any, x: Any, req: Request, fixed: str | None, t_call: float,
              rss0: int, side: Side | None = None) -> _Job:
    """The engine's checks of the model, its output length, causality and the job identity."""
    from ..engine import checks, devices, io

    dev = devices.resolve_device(req.device)
    m = checks.inspect_model(model, x, dev, req.out_steps)
    cands = Candidates(m, dev, rss0)
    t_out = _t_out_before_tracing(m, cands, fixed)
    steps = normalize_out_steps(req.out_steps, t_out)
    is_causal, reason = _causality(model, m, req.causal, t_out, dev)
    from .identity import job_identity

    job = job_identity(io.fingerprint_model(model), x, (m.batch, m.t_in, m.f_in),
                       (m.batch, t_out, m.f_out), steps, is_causal, req.dtype, side)
    cands.job = job
    return _Job(req, x, dev, m, cands, t_out, job, reason, t_call, rss0)


def _causality(model: Any, m: Any, asked: bool | str, t_out: int, dev: str) -> tuple[bool, str]:
    """Whether the job is causal, and why: decided (``"auto"``), checked (``True``) or
    taken on trust (``"trust"``). A promise the numbers break raises ModelError."""
    from .. import events
    from ..engine import causal

    if asked is False:
        return False, "set by the caller (causal=False)"
    if asked == "trust":
        return True, "set by the caller (causal='trust'): taken on trust, not checked"
    same = m.t_in == t_out
    if m.builtin_chain is not None and same:
        with events.phase("detect_causal"):   # decided from the layers alone
            return True, (f"every layer looks back only: {m.builtin_chain}, causal by "
                          "construction (no numerical check needed)")
    if asked is True:
        # Lengths that differ are refused by the plan, which names them.
        return True, (causal.check_causal_promise(m.call, m.short, dev) if same else
                      "set by the caller (causal=True)")
    if not same:
        return False, "output and input lengths differ"
    return causal.detect_causal(model, m.call, m.short, dev)


def _t_out_before_tracing(m: Any, cands: Candidates, fixed: str | None) -> int:
    """The output length at the full input length, tracing only what must be."""
    if fixed is not None:
        return int(cands.build(fixed).t_out)
    if m.t_out is not None:   # the eager checks showed it (strategy="auto" traces nothing
        return int(m.t_out)   # before choosing; checked once the chosen function is traced)
    return int(cands.build("tile").t_out)


def _resume(j: _Job, model: Any, existing: JobStore, blocks_to: Sink | None) -> Any:
    """Go on with a store being resumed, checked against the call."""
    req, stored = j.req, existing.plan
    fn = j.cands.build(stored.strategy)
    existing.check_same_job(j.job)
    asked = {"block_size": req.block_size, "examples_per_block": req.examples_per_block,
             "in_chunk": req.in_chunk, "strategy": None if req.strategy == "auto" else
             req.strategy}
    for key, value in asked.items():
        if value is not None and value != getattr(stored, key):
            raise StoreMismatchError(
                f"the store {str(existing.path)!r} is being written with {key}="
                f"{getattr(stored, key)!r}, this call asks for {key}={value!r}. Resume with "
                f"the same {key} (or leave it out), or pass overwrite=True to start again.")
    fn.bind(stored)
    j.fn, j.plan = fn, stored
    if not JobStore.writable(existing.path):
        missing = stored.n_blocks - len(existing.done_blocks())
        if missing == 0:
            return Jacobian(existing)  # nothing to write: read it where it is
        raise ReadOnlyStoreError(
            f"the store {str(existing.path)!r} is read-only (permissions or a read-only file "
            f"system) and {missing} of its {stored.n_blocks} blocks are still to be "
            "computed. Make it writable, or copy it to a writable place and call again "
            "with the copy's path.")
    return _execute(j, model, existing, blocks_to)


def _new_plan(j: _Job, model: Any, fixed: str | None) -> None:
    """Choose the strategy (or take the fixed one) and plan the job with measured costs."""
    req, m, cands = j.req, j.m, j.cands
    budget = req.memory_budget
    if budget is None and req.block_size is None:
        budget = _worker_budget(req.client) or default_memory_budget()
    options = (req.block_size, req.examples_per_block, budget, req.in_chunk)
    cands.options = options
    if fixed is not None:
        j.fn = cands.build(fixed)
        j.plan = cands.plan_for(j.fn)
        j.choice = {"strategy": fixed, "reason": "set by the caller", "trial_seconds": {},
                    "notes": list(j.fn.notes)}
    else:
        # Per model and shapes (not the input values: their speed is the same).
        key = (j.job["model"], tuple(j.job["input_shape"]), tuple(j.job["out_steps"]),
               j.job["causal"], j.job["dtype"], j.dev, options)
        chosen = cands.choose(model, j.x, key)
        j.fn, j.plan, j.choice, j.precomputed = (chosen.fn, chosen.plan, chosen.record,
                                                 chosen.precomputed)
        cands.keep_only(j.fn.strategy)  # the other candidates' graphs and memory go
    if j.fn.t_out != j.t_out:
        raise ModelError(
            f"the model returned {j.fn.t_out} output steps for {m.t_in} input steps when "
            f"traced, but {m.y_short.shape[1]} for a prefix of {m.short.shape[1]} steps when "
            "called eagerly; jacstream needs a model whose output length follows its "
            "input length the same way in both. Pass strategy='pfor' to check the full "
            "length first.")
    j.choice.update(j.fn.record())


def _worker_budget(client: Any) -> int | None:
    if client is None:
        return None
    from .dask import default_worker_budget

    return default_worker_budget(client)


def _reduce(j: _Job, sink: Any) -> Any:
    """Run the blocks into a streaming reduction; its (saved) result."""
    from .local import run_local

    assert j.plan is not None
    old = sink.start(j.plan, j.job)
    if old is not None:
        return old
    t0 = time.perf_counter()
    stats = run_local(j.plan, sink, j.x, j.fn, progress=j.req.progress,
                      on_nonfinite=j.req.on_nonfinite, on_block=j.req.on_block, t_out=j.t_out)
    return sink.finish({"wall_seconds": round(time.perf_counter() - t0, 3),
                        "compute_seconds": round(stats.compute_seconds, 3),
                        "blocks_computed": len(stats.computed_blocks),
                        "nonfinite_blocks": stats.nonfinite_blocks})


def _execute(j: _Job, model: Any, js: JobStore, blocks_to: Sink | None) -> Jacobian:
    """Run the plan's blocks (locally or on dask), record the run, and return the result."""
    req, plan = j.req, j.plan
    assert plan is not None
    js.upgrade()   # a store written by an earlier version: its records moved, coordinates added
    with PeakTracker() as tracker:
        if req.client is None:
            from .local import run_local

            stats: Any = run_local(
                plan, blocks_to if blocks_to is not None else js, j.x, j.fn,
                progress=req.progress, on_nonfinite=req.on_nonfinite, on_block=req.on_block,
                t_out=j.t_out, precomputed=j.precomputed,
                trim_above=j.rss0 + plan.estimated_peak)
        else:
            from .dask import run_dask

            stats = run_dask(plan, js, j.x, model, client=req.client, job=j.job,
                             device=req.device, sample=j.m.short, fn_spec=j.fn.spec,
                             t_out=j.t_out, progress=req.progress,
                             on_nonfinite=req.on_nonfinite, on_block=req.on_block)
    run = run_record(stats, j.dev, plan, j.fn.traces, j.t_call, tracker.peak - j.rss0, j.fn)
    js.record_run(run)
    result = Jacobian(js)
    result.stats = {**run, "computed_blocks": stats.computed_blocks}
    return result
