"""A job's identity: what must match for a store to be resumed rather than refused.

The fields are those of :data:`jacstream.store.jobstore.IDENTITY`; the model's
fingerprint comes from the engine, the inputs' from here (NumPy only).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ..planning import LAYOUT

__all__ = ["fingerprint_inputs", "job_identity"]


def fingerprint_inputs(inputs: Any, side: Any = None) -> str:
    """A sha256 of the inputs' shape and values, read a slab at a time.

    The values as the model computes on them (float32, or float64 for a float64
    model: ``inputs.dtype``). ``side``: the other inputs of a model of several
    (:class:`jacstream.run.inputs.Side`), whose names, shapes and values count too.
    """
    dtype = np.float64 if np.dtype(inputs.dtype) == np.float64 else np.float32
    h = hashlib.sha256(repr(tuple(inputs.shape)).encode())
    step = max(1, 2**26 // max(1, int(np.prod(inputs.shape[1:])) * 4))
    for i in range(0, inputs.shape[0], step):
        h.update(np.ascontiguousarray(np.asarray(inputs[i:i + step], dtype=dtype)).tobytes())
    if side is not None:
        h.update(f"wrt={side.wrt!r} order={side.order!r}".encode())
        for k, a in side.arrays.items():
            h.update(f"{k!r} {a.shape} {a.dtype}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def job_identity(model_fingerprint: str, inputs: Any, input_shape: tuple[int, int, int],
                 output_shape: tuple[int, int, int], out_steps: tuple[int, ...], causal: bool,
                 dtype: str, side: Any = None) -> dict[str, Any]:
    """The identity fields of a job, as stored in its store's metadata."""
    return {
        "model": model_fingerprint,
        "inputs": fingerprint_inputs(inputs, side),
        "input_shape": list(input_shape),
        "output_shape": list(output_shape),
        "out_steps": list(out_steps),
        "causal": causal,
        "dtype": dtype,
        "layout": list(LAYOUT),
    }
