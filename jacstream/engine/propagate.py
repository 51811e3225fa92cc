"""The chunk algebra of the forward-sensitivity sweep: products of a chunk's linearisation.

For ``k`` steps of a slab of examples, given each step's ``A_j^T (E, S, S)``,
``B_j^T (E, F_in, S)`` and ``C_j (E, S, F_out)`` (transposed as the sweep
multiplies them: row vectors times matrices), these sweep the chunk's own
columns and give what the old columns need (see
:mod:`jacstream.engine.strategies.sensitivity`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ._tf import tf

__all__ = ["grappler_off", "propagated", "stepwise"]


@contextmanager
def grappler_off() -> Iterator[None]:
    """Call the sweep's functions without TensorFlow's graph optimiser (Grappler).

    Its passes took longer than they saved here: the first calls of the forward
    pass and of a chunk took 0.19 s and 0.20 s of CPU with it, 0.12 s and
    0.15 s without, and a whole sweep of the reference model at T=1000 ran
    0.28 s with and 0.25 s without (one thread, ``time.process_time``). The
    option is part of how a function is instantiated, so every call of these
    functions runs under it; it is TensorFlow's process-wide setting, set for
    the call and put back after (other functions keep the user's setting).
    """
    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer",
                                                                False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})


def propagated(a_j: list[tf.Tensor], b_j: list[tf.Tensor], c_j: list[tf.Tensor],
                size: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The chunk's propagators ``P_j = A_j ... A_0`` and its own columns, together.

    Old columns move through ``P_j``: ``J_j(old) = C_j P_j Z_{t0-1}`` and
    ``Z_{t0+k-1}(old) = P_{k-1} Z_{t0-1}``, so the wide ``(n, S)`` operand is
    multiplied twice per chunk instead of once per step (``k S^3`` for the small
    products against ``k n S^2``). ``P_j`` and the chunk's own columns up to
    step ``j`` are one stacked operand ``[P_j; F_j]``, multiplied by ``A_{j+1}``
    once per step (unrolled: ``k`` is fixed per trace) and grown by step ``j +
    1``'s fresh columns ``B_{j+1}``; ``[P_j; F_j] C_j`` gives both ``P_j C_j``
    and the own columns' rows. Returns ``P_{k-1}``, ``W = [P_j C_j]_j`` ``(E, S,
    k F_out)``, the own columns' rows flat, their last ``F_{k-1}`` and whether
    every ``A`` was finite (a non-finite ``A_j`` leaves ``P_{k-1}`` non-finite:
    ``0 * inf`` and ``inf`` stay NaN or infinite through later products).
    """
    k, f_in, f_out = len(a_j), int(b_j[0].shape[1]), int(c_j[0].shape[2])
    pf = tf.concat([a_j[0], b_j[0]], axis=1)
    outs = [tf.matmul(pf, c_j[0])]
    for j in range(1, k):
        pf = tf.concat([tf.matmul(pf, a_j[j]), b_j[j]], axis=1)
        outs.append(tf.matmul(pf, c_j[j]))
    flat = tf.concat(outs, axis=1)           # step j: S rows of P_j C_j, then (j + 1) F_in
    starts = [j * size + f_in * j * (j + 1) // 2 for j in range(k)]
    w_rows = [s + r for s in starts for r in range(size)]
    own_rows = [s + size + r for j, s in enumerate(starts) for r in range((j + 1) * f_in)]
    w = tf.reshape(tf.gather(flat, w_rows, axis=1), [-1, k, size, f_out])
    w = tf.reshape(tf.transpose(w, [0, 2, 1, 3]), [-1, size, k * f_out])
    p_last, f_last = tf.split(pf, [size, k * f_in], axis=1)
    return (p_last, w, tf.gather(flat, own_rows, axis=1), f_last,
            tf.reduce_all(tf.math.is_finite(p_last)))


def stepwise(z: tf.Tensor, a_j: list[tf.Tensor], b_j: list[tf.Tensor], c_j: list[tf.Tensor],
              ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The old columns ``z`` and the chunk's own swept step by step (wide states, short
    sequences: ``n <= S`` columns cost less than the propagators' ``S^3``)."""
    j_old, own, f = [], [], None
    for j, (a, b, c) in enumerate(zip(a_j, b_j, c_j, strict=True)):
        z = tf.matmul(z, a)
        f = b if j == 0 else tf.concat([tf.matmul(f, a), b], axis=1)
        j_old.append(tf.matmul(z, c))
        own.append(tf.matmul(f, c))
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(a)) for a in a_j])
    return z, tf.concat(j_old, axis=2), tf.concat(own, axis=1), f, finite
