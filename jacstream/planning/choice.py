"""Choosing the differentiation strategy for ``strategy="auto"``.

Which strategy is fastest depends on the model and the shapes by large
factors, and so does what it costs to find out: building ``pfor`` through a
Keras LSTM (trace and first calls) takes ~2 s on two cores, more than the
whole Jacobian of the reference model at T=300 with ``tile``. So the choice
is made in two steps:

1. **Shapes.** Each candidate's time is predicted from the Jacobian's shape
   (rows x input steps it must differentiate, after causal truncation), the
   model's kind (recurrent or not) and size, and per-strategy constants
   measured on the project's 2-core CPU (the ``trace`` and ``rate`` of
   :data:`jacstream.planning.strategies.REGISTRY`). The candidates are
   tried in that order.
2. **A timed trial.** The first candidate is traced and times one real block
   of its plan (the block with the most work; its result is kept and
   written, not thrown away). Another candidate is traced and timed (on
   another real block) only when its expected cost - its trace, predicted
   from the first one's measured trace, and the time it would lose on one
   block - is below :data:`TRIAL_SHARE` of the job; a short job keeps the
   predicted choice rather than spend more on trials than they could save.
   The fastest measured candidate wins.

The choice and its evidence (``{"strategy", "reason", "trial_seconds",
"predicted_seconds", ...}``) are recorded in the store metadata; the choice is
cached per model fingerprint and shapes for the rest of the process.

This module is the decision alone, pure Python. What it decides over comes
through three callables, the protocol of :func:`choose`: ``build(name)`` (a
validated block function), ``plan_for(fn)`` (its plan, with its measured
memory cost) and ``run_block(fn, plan, block)`` (one real block, timed here).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelError
from .blocks import Block, Plan
from .steps import inputs_needed
from .strategies import REGISTRY

__all__ = ["CANDIDATES", "Choice", "Shapes", "block_work", "candidates", "choose", "clear_cache",
           "predict"]

CANDIDATES = tuple(name for name, info in REGISTRY.items() if info.candidate)

# Another candidate is tried only if what it may cost is under this share of the job.
TRIAL_SHARE = 0.05

# Seconds per row-step and model parameter for tile (LSTM(32): 2.1e-6 s per row-step),
# plus a floor for tiny models.
SECONDS_PER_PARAM_STEP = {"recurrent": 4.8e-10, "feedforward": 2.5e-10}
SECONDS_PER_STEP_FLOOR = 2e-7

_CACHE: dict[tuple[Any, ...], dict[str, Any]] = {}


def clear_cache() -> None:
    """Forget the choices made so far in this process."""
    _CACHE.clear()


@dataclass(frozen=True)
class Shapes:
    """What the prediction needs to know about a job."""

    batch: int
    t_in: int
    f_in: int
    f_out: int
    out_steps: tuple[int, ...]
    causal: bool
    kind: str          # "recurrent" or "feedforward"
    n_params: int


def work(strategy: str, s: Shapes) -> float:
    """Jacobian rows (reverse) or columns (forward) times input steps fed, for the job."""
    if REGISTRY[strategy].axis == "in":
        needed = inputs_needed(s.out_steps[-1], s.t_in, s.causal)
        return float(s.batch) * s.f_in * needed * needed
    return float(s.batch) * s.f_out * float(sum(inputs_needed(t, s.t_in, s.causal)
                                                for t in s.out_steps))


def candidates(s: Shapes) -> tuple[list[str], list[str]]:
    """The strategies worth considering for these shapes, and why others are not."""
    rows = work("tile", s)
    names, notes = [], []
    for name in CANDIDATES:
        if s.kind not in REGISTRY[name].kinds:
            continue
        cols = work(name, s)
        if REGISTRY[name].axis == "in" and cols >= rows:
            notes.append(
                f"{name} not considered: it would differentiate {cols:.3g} column-steps, "
                f"reverse mode {rows:.3g} row-steps (forward mode pays when F_in x T_in is "
                "well below F_out x the output steps)")
        else:
            names.append(name)
    return names, notes


def predict(strategy: str, s: Shapes) -> tuple[float, float]:
    """Predicted (trace seconds, compute seconds) of a strategy on this job."""
    info = REGISTRY[strategy]
    per_step = max(SECONDS_PER_STEP_FLOOR, SECONDS_PER_PARAM_STEP[s.kind] * s.n_params)
    return info.trace[s.kind], info.rate[s.kind] * per_step * work(strategy, s)


@dataclass
class Choice:
    """The chosen strategy, its validated block function and plan, and the evidence."""

    strategy: str
    fn: Any
    plan: Plan
    record: dict[str, Any]
    precomputed: dict[int, Any] = field(default_factory=dict)  # what run_block returned


@dataclass
class _Trial:
    fn: Any
    plan: Plan
    trace_seconds: float
    block: Block | None = None
    block_seconds: float = 0.0
    seconds_per_work: float = 0.0
    remaining: float = 0.0
    result: Any = None


def _update_remaining(trials: dict[str, _Trial]) -> None:
    """Seconds each tried strategy would need for the blocks not yet computed.

    Blocks computed by any trial on the same blocking are kept, so they do not count.
    """
    for t in trials.values():
        done = sum(block_work(u.plan, u.block, t.fn) for u in trials.values()
                   if u.block is not None and _same_blocks(u.plan, t.plan))
        total = sum(block_work(t.plan, b, t.fn) for b in t.plan.blocks)
        t.remaining = t.seconds_per_work * max(0.0, total - done)


def block_work(plan: Plan, b: Block, fn: Any = None) -> float:
    """A block's work in the units its time scales with.

    Rows (or columns) x input steps, unless the block function counts its own
    (``fn.block_work``: a sweep's cost grows with the columns it carries, not
    with the rows of the block).
    """
    if fn is not None and hasattr(fn, "block_work"):
        return float(fn.block_work(plan, b))
    e = b.examples[1] - b.examples[0]
    if plan.axis == "in":
        c0, c1 = b.columns
        return float(e) * (c1 - c0) * plan.f_in * b.in_len
    return float(e) * (b.positions[1] - b.positions[0]) * plan.f_out * b.in_len


def _pick_block(plan: Plan, avoid: set[int]) -> Block | None:
    """The block with the most work that is not in ``avoid`` (first one on ties).

    A strategy that sweeps in time computes every block before the one asked
    for: its trial block is the first (which the run then continues from).
    """
    if REGISTRY[plan.strategy].sweeps:
        return next((b for b in plan.blocks if b.index not in avoid), None)
    best: Block | None = None
    for b in plan.blocks:
        if b.index not in avoid and (best is None or block_work(plan, b)
                                     > block_work(plan, best)):
            best = b
    return best


def _same_blocks(a: Plan, b: Plan) -> bool:
    return (a.axis, a.block_size, a.examples_per_block, a.chunks) == \
        (b.axis, b.block_size, b.examples_per_block, b.chunks)


def choose(candidates: Sequence[str], shapes: Shapes, *, build: Callable[[str], Any],
           plan_for: Callable[[Any], Plan], run_block: Callable[[Any, Plan, Block], Any],
           cache_key: tuple[Any, ...] | None = None,
           trial_share: float | None = None,
           unavailable: tuple[type[BaseException], ...] = ()) -> Choice:
    """Choose among ``candidates`` (see the module docstring).

    ``build(name)`` returns a traced, validated block function (raising
    ``StrategyUnavailable`` when the strategy cannot differentiate the model),
    ``plan_for(fn)`` its plan (measuring its memory cost), ``run_block(fn,
    plan, block)`` computes one block. A candidate whose ``build`` raises one
    of ``unavailable`` is left out (the reason is kept in the record's notes).
    ``trial_share=float("inf")`` tries every candidate; ``0`` none beyond the
    predicted best (default :data:`TRIAL_SHARE`).
    """
    share = TRIAL_SHARE if trial_share is None else trial_share
    cached = _CACHE.get(cache_key) if cache_key is not None else None
    if cached is not None and cached["strategy"] in candidates:
        fn = build(cached["strategy"])
        record = {**cached, "reason": "chosen earlier in this process for the same model "
                  "and shapes: " + cached["reason"], "cached": True}
        return Choice(cached["strategy"], fn, plan_for(fn), record)

    predicted = {c: predict(c, shapes) for c in candidates}
    order = sorted(candidates, key=lambda c: sum(predicted[c]))
    trials: dict[str, _Trial] = {}
    notes: list[str] = []
    t_start = time.perf_counter()
    for c in order:
        skip = _not_worth_trying(c, trials, predicted, share, time.perf_counter() - t_start)
        if skip:
            notes.append(skip)
            continue
        t0 = time.perf_counter()
        try:
            fn = build(c)
        except unavailable as e:
            notes.append(f"{c} unavailable: {e}")
            continue
        trials[c] = _run_trial(fn, plan_for(fn), time.perf_counter() - t0, trials, run_block)
        _update_remaining(trials)
    if not trials:
        raise ModelError("no strategy could differentiate this model: " + "; ".join(notes))
    name = min(trials, key=lambda c: trials[c].remaining)
    return _decided(name, trials, predicted, order, shapes, notes, cache_key)


def _not_worth_trying(c: str, trials: dict[str, _Trial], predicted: dict[str, tuple[float, float]],
                      share: float, elapsed: float) -> str | None:
    """Why candidate ``c`` is not tried after the trials so far (None: try it)."""
    if not trials:
        return None
    best = min(trials.values(), key=lambda t: t.remaining)
    first_name, first = next(iter(trials.items()))
    # Machine speed from the first trial; the rest from the prior's ratios.
    trace_est = first.trace_seconds * predicted[c][0] / predicted[first_name][0]
    rate_ratio = (predicted[c][1] / predicted[first_name][1]
                  if predicted[first_name][1] > 0 else 1.0)
    block_loss = max(0.0, first.block_seconds * (rate_ratio - 1.0))
    job = elapsed + best.remaining
    if trace_est + block_loss <= share * job:
        return None
    return (f"{c} not tried: tracing it (~{trace_est:.2g} s) and one slower block "
            f"(~{block_loss:.2g} s) would cost more than {share:.0%} of the job (~{job:.2g} s)")


def _run_trial(fn: Any, plan: Plan, trace_seconds: float, trials: dict[str, _Trial],
               run_block: Callable[[Any, Plan, Block], Any]) -> _Trial:
    """Time a real block; with a plan shared with an earlier trial, another block of it,
    so that every trial block can be kept."""
    trial = _Trial(fn, plan, trace_seconds)
    avoid = {t.block.index for t in trials.values()
             if t.block is not None and _same_blocks(t.plan, plan)}
    block = _pick_block(plan, avoid)
    if block is not None:
        t1 = time.perf_counter()
        trial.result = run_block(fn, plan, block)
        trial.block_seconds = time.perf_counter() - t1
        trial.block = block
        # A sweep's one-time start (its forward pass over the whole sequence) is not
        # paid again by the blocks after it.
        once = float(getattr(fn, "setup_seconds", 0.0))
        trial.seconds_per_work = max(0.0, trial.block_seconds - once) / max(
            1.0, block_work(plan, block, fn))
    return trial


def _decided(name: str, trials: dict[str, _Trial], predicted: dict[str, tuple[float, float]],
             order: list[str], shapes: Shapes, notes: list[str],
             cache_key: tuple[Any, ...] | None) -> Choice:
    """The choice of ``name`` with its evidence (and remembered under ``cache_key``)."""
    chosen = trials[name]
    precomputed = {t.block.index: t.result for t in trials.values()
                   if t.block is not None and t.result is not None
                   and _same_blocks(t.plan, chosen.plan)}
    if len(trials) == 1:
        reason = (f"{name}: fastest predicted from the shapes (predicted seconds: "
                  + ", ".join(f"{c} {sum(predicted[c]):.3g}" for c in order) + ")")
    else:
        reason = (f"{name}: fastest in the timed trial (estimated seconds for the rest of the "
                  "job: " + ", ".join(f"{c} {t.remaining:.3g}" for c, t in trials.items()) + ")")
    record = {
        "strategy": name,
        "reason": reason,
        "trial_seconds": {c: round(t.block_seconds, 4) for c, t in trials.items()},
        "trace_seconds": {c: round(t.trace_seconds, 4) for c, t in trials.items()},
        "trial_blocks": {c: t.block.index for c, t in trials.items() if t.block is not None},
        "predicted_seconds": {c: round(sum(p), 4) for c, p in predicted.items()},
        "model_kind": shapes.kind,
        "notes": notes + [f"{name}: {n}" for n in getattr(chosen.fn, "notes", [])],
    }
    if cache_key is not None:
        _CACHE[cache_key] = {k: record[k] for k in ("strategy", "reason", "trial_seconds",
                                                    "trace_seconds", "predicted_seconds",
                                                    "model_kind")}
    return Choice(name, chosen.fn, chosen.plan, record, precomputed)
