"""Python's cyclic garbage collector, kept off the objects that were there before a job.

A process that imported TensorFlow and Keras holds a few million objects the
cyclic collector tracks; tracing a block function creates several hundred
thousand more, which triggers a full collection that walks them all. On the
reference model at T=1000 that one collection took 0.21 s of a 1.4 s job
(timed with :data:`gc.callbacks` around one :func:`jacstream.jacobian` call;
with this, the collections of that call took 0.006 s in all). :func:`frozen` moves the objects that exist when the job starts
to the collector's permanent generation for the job's duration
(:func:`gc.freeze`), so collections during the job walk only what the job
made, and gives them back afterwards (:func:`gc.unfreeze`). Nothing is kept
alive that would have been freed: objects in the permanent generation are
still freed by reference counting, and cycles among them are collected after
the job.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["frozen"]

_lock = threading.Lock()
_depth = 0


@contextmanager
def frozen() -> Iterator[None]:
    """Run the body with the objects that exist now frozen out of garbage collection."""
    global _depth
    with _lock:
        if _depth == 0:
            gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.unfreeze()
