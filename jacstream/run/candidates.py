"""The strategy's block function for a job: a fixed one, the stored one, or the auto choice.

:class:`Candidates` is what :func:`jacstream.planning.choice.choose` decides over:
it builds validated block functions (once each), plans each with its own
measured memory cost, and runs trial blocks.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from typing import Any

import numpy as np

from .. import events
from .._memory import current_rss, release_free_memory
from ..errors import StrategyUnavailable
from ..planning import Block, CostModel, Plan, make_plan
from ..planning import choice as choice_mod

__all__ = ["Candidates"]


class Candidates:
    """The validated block function of each strategy for one job, traced once per call.

    ``options``: ``(block_size, examples_per_block, budget, in_chunk)``; ``job``:
    the job's identity (shapes, out_steps, causal, dtype).
    """

    def __init__(self, m: Any, dev: str, rss0: int) -> None:
        self.m, self.dev, self.rss0 = m, dev, rss0
        self.fns: dict[str, Any] = {}
        self.job: dict[str, Any] = {}
        self.options: tuple[Any, ...] = (None, None, None, None)
        # What tracing and probing took, measured once (see plan_for).
        self.overhead: int | None = None
        self.x: Any = None   # the job's inputs, for trial blocks

    def build(self, name: str) -> Any:
        """Strategy ``name``'s validated block function (raises StrategyUnavailable)."""
        if name not in self.fns:
            from ..engine.build import validated

            m = self.m
            fn = validated(m.call, name, m.f_in, m.f_out, self.dev, m.sample, m.short,
                           m.y_short.shape, dtype=m.dtype, y_short=m.y_short)
            if hasattr(fn, "batch_hint"):   # a cost model from the shapes plans for the batch
                fn.batch_hint = m.batch
            self.fns[name] = fn
        return self.fns[name]

    def keep_only(self, name: str) -> None:
        """Drop every other strategy's function and return the memory it held."""
        dropped = [k for k in self.fns if k != name]
        for k in dropped:
            del self.fns[k]
        if dropped:
            gc.collect()
            release_free_memory()

    def plan_for(self, fn: Any) -> Plan:
        """The plan of a validated block function, with its own measured memory cost."""
        from ..engine.probes import probe_cost

        block_size, examples_per_block, budget, in_chunk = self.options
        cost = None
        if block_size is None:
            cost = probe_cost(fn, self.m.sample)  # two examples: the cost is per example
            # Measured once (after a trial block the allocator keeps that block's memory,
            # which the next block reuses), with the probes' freed memory returned first:
            # the blocks' own peaks count it.
            if self.overhead is None:
                release_free_memory()
                self.overhead = current_rss() - self.rss0
            cost = _with_fixed(cost, self.overhead)
        job = self.job
        p = make_plan(job["input_shape"], job["output_shape"], out_steps=job["out_steps"],
                      block_size=block_size, examples_per_block=examples_per_block,
                      memory_budget=budget, causal=job["causal"], strategy=fn.strategy,
                      dtype=job["dtype"], cost=cost, in_chunk=in_chunk)
        fn.bind(p)
        return p

    def run_block(self, fn: Any, plan: Plan, block: Block) -> Any:
        """One trial block of ``plan`` on the job's inputs."""
        with events.phase("trial", f"{fn.strategy} (block {block.index} of {plan.n_blocks})"):
            e0, e1 = block.examples
            return fn.compute(plan, block, np.asarray(self.x[e0:e1]))  # binds its examples

    def choose(self, model: Any, x: Any, key: tuple[Any, ...]) -> choice_mod.Choice:
        """``strategy="auto"``: predict from the shapes, then time real blocks."""
        from ..engine.models import model_kind

        self.x = x
        (batch, t_in, f_in), f_out = self.job["input_shape"], self.m.f_out
        kind, n_params = model_kind(model, self.m.call, f_in)
        shapes = choice_mod.Shapes(batch, t_in, f_in, f_out, tuple(self.job["out_steps"]),
                                   self.job["causal"], kind, n_params)
        names, notes = choice_mod.candidates(shapes)
        names, notes = _decomposable(self.m.call, names, notes)
        chosen = choice_mod.choose(names, shapes, build=self.build, plan_for=self.plan_for,
                                   run_block=self.run_block, cache_key=key,
                                   unavailable=(StrategyUnavailable,))
        chosen.record["notes"] = notes + chosen.record.get("notes", [])
        return chosen


def _decomposable(call: Any, names: list[str], notes: list[str]) -> tuple[list[str], list[str]]:
    """Leave out the sweeping strategies the model's layers cannot be decomposed for, and say
    why (pure Python: which layers the model has, before anything is traced)."""
    from ..engine.recurrence import NotApplicable, decompose
    from ..planning.strategies import REGISTRY

    if not any(REGISTRY[n].sweeps for n in names):
        return names, notes
    try:
        decompose(call)
    except NotApplicable as e:
        gone = [n for n in names if REGISTRY[n].sweeps]
        return ([n for n in names if n not in gone],
                notes + [f"{n} unavailable: {e}" for n in gone])
    return names, notes


def _with_fixed(cost: CostModel, overhead: int) -> CostModel:
    """Count what tracing and the probes already took as part of the fixed cost."""
    return replace(cost, fixed=cost.fixed + max(0, overhead))
