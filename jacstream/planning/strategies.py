"""The strategies: one table of their names and what planning knows of each.

Every strategy jacstream can use is one row of :data:`REGISTRY`. Planning
reads the axis its blocks run along, how many Jacobian rows a block is worth
and the prior of the time prediction; the engine imports the ``module`` that
implements it (``jacstream/engine/strategies/<name>.py``, a subclass of
:class:`jacstream.engine.strategies.base.BlockFunction`). The CLI's and
:func:`jacstream.jacobian`'s choices are ``("auto", *STRATEGIES)``.

To add a strategy: write its engine module and add one row here. Nothing else
lists strategy names.

No TensorFlow here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REGISTRY", "STRATEGIES", "StrategyInfo"]


@dataclass(frozen=True)
class StrategyInfo:
    """What planning knows of one strategy.

    ``axis``: ``"out"`` for blocks of output steps (rows of the Jacobian, reverse
    mode), ``"in"`` for blocks of input steps (columns, forward mode). ``max_rows``:
    Jacobian rows (or columns) per block beyond which a block gets no faster per
    row, only bigger. ``trace`` and ``rate``: the prior of the time prediction per
    model kind (see :mod:`jacstream.planning.choice`). ``candidate``: whether
    ``strategy="auto"`` considers it. ``kinds``: the model kinds it can apply to.
    ``sweeps``: its blocks of one slab of examples come from one sweep forward in
    time, in order (plans order such blocks by slab first).
    """

    name: str
    axis: str
    max_rows: int
    trace: dict[str, float]
    rate: dict[str, float]
    candidate: bool = True
    kinds: tuple[str, ...] = ("recurrent", "feedforward")
    sweeps: bool = False

    @property
    def module(self) -> str:
        """The engine module implementing it."""
        return f"jacstream.engine.strategies.{self.name}"


# max_rows: pfor shares one forward pass among a block's rows: on 2 cores its speed
# stops improving at about a thousand rows (reference LSTM, T=1000: K=100 fastest;
# K=50 +20% time). tile repeats the forward pass for every row, so small blocks cost
# it little: 250 rows instead of 1000 took the same time at T=300 and +10% at T=1000,
# with a third of the memory. Forward mode counts columns the same way.
# trace / rate: measured on the project's 2-core CPU (tensorflow-cpu 2.21; shared/NOTES.md
# models, batch 10, T=300 and 1000): trace seconds, and seconds per Jacobian row (or
# column) per input step relative to ``tile``. Recurrent models (a while loop) trace
# slowly under pfor and need forward mode's transpose implementation. pfor's build
# (trace and first calls): 1.8-2.5 s for the LSTM and GRU since engine.pfor's
# fast_pfor_tracing (T=300 and 1000, attrs["strategy_choice"]["trace_seconds"] with every
# candidate tried; `python -m benchmarks.phases --T 1000`: 2.6 s, 6.3 s before).
# sensitivity (recurrent chains only; engine/strategies/sensitivity.py): build ~0.6 s
# (forward pass, prefix checks, one chunk trace), then a small fraction of tile's time
# per row-step that shrinks with T (whole calls, benchmark runner: 0.80 s at T=300 and
# 1.15 s at T=1000, benchmarks/results/sensitivity; tile took 2.8 s and 9.1 s in the
# README's earlier full run). Listed first: it wins ties of the prediction.
REGISTRY: dict[str, StrategyInfo] = {s.name: s for s in (
    StrategyInfo("sensitivity", "out", 640, trace={"recurrent": 0.6, "feedforward": 0.6},
                 rate={"recurrent": 0.04, "feedforward": 0.04}, kinds=("recurrent",),
                 sweeps=True),
    StrategyInfo("pfor", "out", 1024, trace={"recurrent": 2.0, "feedforward": 1.0},
                 rate={"recurrent": 0.6, "feedforward": 0.35}),
    StrategyInfo("tile", "out", 256, trace={"recurrent": 0.7, "feedforward": 0.6},
                 rate={"recurrent": 1.0, "feedforward": 1.0}),
    StrategyInfo("forward", "in", 1024, trace={"recurrent": 3.0, "feedforward": 1.1},
                 rate={"recurrent": 3.5, "feedforward": 1.1}),
)}

STRATEGIES = tuple(REGISTRY)
