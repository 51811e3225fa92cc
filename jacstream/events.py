"""Phase events: who wants to know how long each phase of a call took.

A phase is a named stretch of one :func:`jacstream.jacobian` call: ``checks``
(the eager model checks), ``detect_causal``, ``build`` (tracing and validating
one strategy's block function), ``probes`` (memory probes), ``trial`` (a block
timed by the strategy trial) and ``blocks`` (the run's own blocks). Listeners
get ``(phase, seconds)`` once each phase ends; with none, a phase costs one
``perf_counter`` call. ``benchmarks/phases.py`` listens instead of patching
jacstream's functions.

Examples
--------
>>> from jacstream import events
>>> seen = []
>>> with events.listen(lambda phase, s: seen.append(phase)):
...     with events.phase("checks"):
...         pass
>>> seen
['checks']
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

__all__ = ["PHASES", "listen", "phase"]

PHASES = ("checks", "detect_causal", "build", "probes", "trial", "blocks")

Listener = Callable[[str, float], None]
_LISTENERS: list[Listener] = []


@contextlib.contextmanager
def listen(listener: Listener) -> Iterator[Listener]:
    """Inside ``with``: call ``listener(phase, seconds)`` at the end of every phase."""
    _LISTENERS.append(listener)
    try:
        yield listener
    finally:
        _LISTENERS.remove(listener)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the ``with`` block as phase ``name`` (one of :data:`PHASES`) for the listeners."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        for listener in list(_LISTENERS):
            listener(name, seconds)
