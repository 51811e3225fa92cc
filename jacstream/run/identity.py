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


def fingerprint_inputs(inputs: Any) -> str:
    """A sha256 of the inputs' shape and float32 values, read a slab at a time."""
    h = hashlib.sha256(repr(tuple(inputs.shape)).encode())
    step = max(1, 2**26 // max(1, int(np.prod(inputs.shape[1:])) * 4))
    for i in range(0, inputs.shape[0], step):
        h.update(np.ascontiguousarray(np.asarray(inputs[i:i + step], dtype=np.float32)).tobytes())
    return h.hexdigest()


def job_identity(model_fingerprint: str, inputs: Any, input_shape: tuple[int, int, int],
                 output_shape: tuple[int, int, int], out_steps: tuple[int, ...], causal: bool,
                 dtype: str) -> dict[str, Any]:
    """The identity fields of a job, as stored in its store's metadata."""
    return {
        "model": model_fingerprint,
        "inputs": fingerprint_inputs(inputs),
        "input_shape": list(input_shape),
        "output_shape": list(output_shape),
        "out_steps": list(out_steps),
        "causal": causal,
        "dtype": dtype,
        "layout": list(LAYOUT),
    }
