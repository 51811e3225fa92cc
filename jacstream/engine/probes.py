"""Memory probes: the cost model of a block function, measured with two small blocks."""

from __future__ import annotations

import numpy as np

from .. import events
from .._memory import release_free_memory
from ..errors import ModelError
from ..planning import CostModel
from .devices import peak_tracker
from .strategies import BlockFunction

__all__ = ["probe_cost"]


def probe_cost(fn: BlockFunction, x: np.ndarray, max_len: int = 512) -> CostModel:
    """Measure the memory cost model of ``fn`` with two small blocks (no extra trace).

    Probes on a prefix of ``max_len`` steps; a model that only accepts its
    full length is probed at full length with smaller blocks. On a GPU the
    device's own allocator statistics are measured
    (``tf.config.experimental.get_memory_info``), so the budget bounds
    device memory; on the CPU, resident memory.
    """
    if fn.static:
        return CostModel()
    if hasattr(fn, "cost_model"):    # a cost that follows from the shapes: nothing to probe
        return fn.cost_model()
    # Where the output length does not follow the input length (a forecaster's horizon,
    # a strided model), only the full length has a known number of output steps.
    follows = fn.t_out in (0, x.shape[1])   # 0: not known (taken as following)
    with events.phase("probes", fn.strategy):
        try:
            return _probe(fn, x, min(x.shape[1], max_len) if follows else x.shape[1], 64)
        except ModelError:
            raise
        except Exception:
            return _probe(fn, x, x.shape[1], 2)


def _probe_block(fn: BlockFunction, xs: np.ndarray, k: int, t_out: int) -> None:
    length = xs.shape[1]
    if fn.axis == "in":
        fn(xs, np.arange(t_out, dtype=np.int32), length, (0, min(k, length)))
    else:
        # k rows of the t_out output steps there are (repeated where k > t_out)
        fn(xs, np.arange(k, dtype=np.int32) % t_out)


def _probe(fn: BlockFunction, x: np.ndarray, length: int, k_max: int) -> CostModel:
    xs = np.ascontiguousarray(x[:, :length])
    t_out = length if length < x.shape[1] else (fn.t_out or length)  # a prefix: they follow
    k2 = max(2, min(k_max, length if fn.axis == "in" else t_out))
    # No warm-up call: validation already ran the function at full length.
    # Each probe starts from a trimmed heap, and the larger one is measured twice
    # (the larger of the two counts): the difference between them, tens of MB, is
    # what the blocks scale by, and a reused free block would hide part of it.
    peaks = []
    for k in (1, k2, k2):
        release_free_memory()
        with peak_tracker(fn.spec.device) as t:
            _probe_block(fn, xs, k, t_out)
        peaks.append(t.increase)
    peaks = [peaks[0], max(peaks[1:])]
    b = x.shape[0]
    # rows of the Jacobian per block step: output features (reverse), input features
    # (forward: tangents)
    unit = fn.spec.f_in if fn.axis == "in" else fn.spec.f_out
    per_row = max(0.0, (peaks[1] - peaks[0]) / ((k2 - 1) * unit * b * length))
    per_step = max(0.0, (peaks[0] - per_row * unit * b * length) / (b * length))
    # Safety factors for allocator slack and temporaries that small probes miss.
    # Measured (reference LSTM, batch 10, 1 GiB budget, probes on trimmed heaps):
    # this model without the factors was 4% (T=3000) and 7% (T=1000) under the real
    # block working set; with untrimmed probes it had been 37% under at T=3000.
    return CostModel(fixed=32 * 2**20, per_step=1.15 * per_step + 256,
                     per_row_step=1.15 * per_row + 64, measured=True)
