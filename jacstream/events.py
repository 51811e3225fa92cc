"""Phase events: who wants to know how long each phase of a call took.

A phase is a named stretch of one :func:`jacstream.jacobian` call: ``checks``
(the eager model checks), ``detect_causal``, ``build`` (tracing and validating
one strategy's block function), ``probes`` (memory probes), ``trial`` (a block
timed by the strategy trial) and ``blocks`` (the run's own blocks). Listeners
get ``(phase, seconds)`` once each phase ends, and start listeners
``(phase, detail)`` as it begins (``detail``: e.g. the strategy being traced);
with none, a phase costs one ``perf_counter`` call. ``benchmarks/phases.py``
listens instead of patching jacstream's functions; the progress display
(:mod:`jacstream.run.progress`) says what is happening before the first block.

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
StartListener = Callable[[str, str], None]
_LISTENERS: list[Listener] = []
_STARTS: list[StartListener] = []


@contextlib.contextmanager
def listen(listener: Listener | None = None, *,
           on_start: StartListener | None = None) -> Iterator[Listener | None]:
    """Inside ``with``: call ``listener(phase, seconds)`` at the end of every phase, and
    ``on_start(phase, detail)`` at its beginning."""
    if listener is not None:
        _LISTENERS.append(listener)
    if on_start is not None:
        _STARTS.append(on_start)
    try:
        yield listener
    finally:
        if listener is not None:
            _LISTENERS.remove(listener)
        if on_start is not None:
            _STARTS.remove(on_start)


@contextlib.contextmanager
def phase(name: str, detail: str = "") -> Iterator[None]:
    """Time the ``with`` block as phase ``name`` (one of :data:`PHASES`) for the listeners.

    ``detail`` says more to the start listeners (which strategy, how many blocks).
    """
    for start in list(_STARTS):
        start(name, detail)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        for listener in list(_LISTENERS):
            listener(name, seconds)
