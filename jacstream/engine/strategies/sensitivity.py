"""The forward-sensitivity strategy: Jacobians of recurrent models at the arithmetic floor.

A model that is a chain ``per-step layers -> forward RNN -> per-step layers ->
... -> per-step layers`` is a recurrence over one state ``s_t`` (every RNN
layer's states side by side)::

    s_t = step(s_{t-1}, x_t)        y_t = head(s_t)

Linearised, ``A_t = ds_t/ds_{t-1}``, ``B_t = ds_t/dx_t`` and ``C_t =
dy_t/ds_t`` give every Jacobian entry of a causal model:

    Z_t = A_t Z_{t-1} + B_t E_t       J[:, t] = C_t Z_t

where ``Z_t = ds_t/dx_{0..t}`` has one column per input (step, feature) seen so
far. One sweep forward in time computes only the causal prefix, finishes each
output step's rows when it passes it (so blocks of output steps stream to the
store in order), and costs one small matrix product per step and column: no
loop over Jacobian rows, no vectorised backward pass.

* ``A_t, B_t, C_t`` are formed for a chunk of steps at once, vectorised over
  examples x steps: in closed form for Keras' ``LSTMCell``, ``GRUCell``
  (``reset_after=True``) and ``SimpleRNNCell``, by automatic differentiation
  for any other cell and for the per-step layers.
* A column of ``Z`` that is exactly zero stays zero at every later step
  (``Z_t = A_t Z_{t-1}`` for old columns), so leading columns that are exactly
  zero for every example of the slab are dropped: this is exact, never a
  cut-off, and past the lag where the gradients underflow the cost grows as
  ``T x band`` instead of ``T^2``. It is off while a chunk's ``A_t`` is not
  finite (``0 * inf`` is NaN, not zero).
* Inside a chunk the old columns move through the chunk's propagators
  ``P_j = A_j ... A_0`` (small ``S x S`` products): the wide ``(columns x S)``
  operand is multiplied twice per chunk instead of once per step.
* Nothing is assumed: :func:`~jacstream.engine.recurrence.decompose` matches
  the layers against a known set; on the checked prefix, the decomposed forward
  pass must reproduce the model's outputs to float32 rounding and the Jacobian
  must match ordinary reverse-mode gradients (:meth:`Sensitivity.check`).

The linearisation of the cells is in :mod:`jacstream.engine.linearize`, the
decomposition in :mod:`jacstream.engine.recurrence`, a chunk's products in
:mod:`jacstream.engine.propagate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from ...planning import Block, CostModel, Plan
from .._tf import keras, tf
from ..linearize import linearize_cell, per_step_jacobian_t
from ..models import call_model
from ..propagate import grappler_off, propagated, stepwise
from ..recurrence import (
    NotApplicable,
    Recurrent,
    apply_steps,
    cell_step,
    close_or_refuse,
    decompose,
    reverse_reference,
    rowwise_jacobian,
)
from .base import BlockFunction, Computed, FunctionSpec

__all__ = ["CHUNK", "Sensitivity", "chunk_for"]

# Steps linearised and swept per traced call: long enough to amortise the call,
# short enough that the chunk's loop traces in well under a second.
CHUNK = 32
# Bound on the chunk's own matrices (A, the propagators, their products) for a slab.
CHUNK_BYTES = 192 * 2**20
# States at most this wide always move old columns through propagators (see modes).
NARROW_STATE = 128


def chunk_for(state_size: int, examples: int, f_in: int = 1) -> int:
    """Steps per traced chunk: :data:`CHUNK`, fewer where the chunk's matrices (``k x
    examples x S^2`` floats, several times) would pass :data:`CHUNK_BYTES`.

    Depends on the shapes only, so that every process of a job (the client and
    each dask worker) cuts the same chunks and computes the same bits.
    """
    per_step = examples * 4 * (8 * state_size * state_size + 4 * CHUNK * f_in * state_size)
    return int(max(1, min(CHUNK, CHUNK_BYTES // max(per_step, 1))))


class Sensitivity(BlockFunction):
    """Blocks of output steps by one forward sweep per slab of examples.

    ``fn(x, idx, in_len)`` returns ``(J, y_shape, fed)`` with ``J`` of shape
    ``(examples, len(idx), F_out, in_len, F_in)``, as reverse-mode strategies do.
    The sweep of a slab is carried from call to call: called with the next
    output steps of the same inputs it continues where it stopped; with other
    inputs, or earlier steps, it starts again from step 0 (which is how a
    resumed run, or a dask worker given blocks out of order, gets its blocks:
    the same chunks from step 0, so the same bits). The model is the
    decomposed chain (:class:`NotApplicable` in the constructor otherwise).
    """

    impls: ClassVar[tuple[str, ...]] = ("sensitivity",)
    optional: ClassVar[bool] = True
    sweeps: ClassVar[bool] = True

    def __init__(self, call: Callable[[Any], Any], spec: FunctionSpec) -> None:
        super().__init__(call, spec)
        try:
            self.chain = decompose(call)
        except NotApplicable as e:
            raise NotApplicable(
                f"strategy='sensitivity' does not apply to this model: {e}. It needs "
                "per-step layers around forward RNN layers that return sequences; use "
                "strategy='auto' (or 'pfor', 'tile').") from None
        self.dtype = tf.as_dtype(spec.dtype)
        self.batch_hint = 1           # examples the cost model plans for (run.candidates)
        self.setup_seconds = 0.0      # the last sweep's start: its forward pass
        self.swept_columns = 0        # (column, step) pairs carried by the sweeps
        self.dropped_columns = 0      # (column, step) pairs dropped as exactly zero
        self.widest_lag = 0           # the most input steps back any sweep still carried
        self._sweep: _Sweep | None = None
        self._forward_fn = tf.function(self._forward, input_signature=[
            tf.TensorSpec([None, None, self.f_in], self.dtype)], autograph=False)
        self._chunk_fns: dict[tuple[int, bool], Any] = {}

    def modes(self, shape: Sequence[int]) -> tuple[int, bool]:
        """``(steps per chunk, propagators?)`` for a slab of inputs of ``shape``.

        Propagators cost ``k S^3`` per chunk against ``k n S^2`` step by step
        (``n`` columns carried): they pay when the sequence is longer than the
        state is wide, and cost little either way for a narrow state.
        """
        size = self.chain.state_size
        # A narrow state always: the propagators then cost little even on short prefixes,
        # and the checks and the job trace the same chunk function.
        return (chunk_for(size, int(shape[0]), self.f_in),
                size <= NARROW_STATE or int(shape[1]) > size)

    # -- traced pieces ----------------------------------------------------
    def _forward(self, x: tf.Tensor) -> tuple[list[tf.Tensor], ...]:
        """Every stage's per-step inputs and states ``(E, T, .)``, and the head's output."""
        self.traces += 1
        e, t = tf.shape(x)[0], tf.shape(x)[1]
        mask = self._mask(x)                      # (E, T, 1) or None
        feed, width = (x, self.f_in) if mask is None else (tf.where(mask, x, 0), self.f_in)
        us, ss, inits = [], [], []
        for rnn in self.chain.rnns:
            u = tf.reshape(apply_steps(rnn.before, tf.reshape(feed, [e * t, width])),
                           [e, t, rnn.in_size])
            s, s0 = self._scan(rnn, u, mask)
            inits.append(s0)
            us.append(u)
            ss.append(s)
            feed, width = s[:, :, :rnn.out_size], rnn.out_size
            if mask is not None and rnn.layer.zero_output_for_mask:
                feed = tf.where(mask, feed, 0)
        y = apply_steps(self.chain.head, tf.reshape(feed, [e * t, width]))
        return us, ss, inits, tf.reshape(y, [e, t, -1])

    def _mask(self, x: tf.Tensor) -> tf.Tensor | None:
        """Keras' Masking: ``True`` where some feature differs from the mask value."""
        if self.chain.mask_value is None:
            return None
        return tf.reduce_any(tf.not_equal(x, tf.cast(self.chain.mask_value, x.dtype)),
                             axis=-1, keepdims=True)

    def _scan(self, rnn: Recurrent, u: tf.Tensor,
              mask: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        e, t = tf.shape(u)[0], tf.shape(u)[1]
        init = tf.zeros([e, rnn.size], u.dtype)
        if hasattr(rnn.cell, "get_initial_state"):
            st = tf.nest.flatten(rnn.cell.get_initial_state(batch_size=e))
            init = tf.concat([tf.cast(v, u.dtype) for v in st], axis=-1)
        ut = tf.transpose(u, [1, 0, 2])
        mt = None if mask is None else tf.transpose(mask, [1, 0, 2])
        ta = tf.TensorArray(u.dtype, size=t)

        def body(k: tf.Tensor, s: tf.Tensor, ta: tf.TensorArray) -> tuple[Any, ...]:
            new = cell_step(rnn, ut[k], s)
            s = new if mt is None else tf.where(mt[k], new, s)   # a masked step carries s
            return k + 1, s, ta.write(k, s)

        _, _, ta = tf.while_loop(lambda k, *_: k < t, body, (0, init, ta))
        return tf.transpose(ta.stack(), [1, 0, 2]), init

    def _linearize(self, x: tf.Tensor, us: list[tf.Tensor], prev: list[tf.Tensor],
                   new: list[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """``AT (N, S, S)``, ``BT (N, F_in, S)``, ``CT (N, S, F_out)`` for rows ``N``.

        Stage l's state depends on the previous step's own state and, through its
        per-step input layers, on stage l-1's output at the same step:
        ``d s^l_t = A^l d s^l_{t-1} + G^l d h^{l-1}_t``, so its column block of
        ``AT`` is ``AT[:, :, h^{l-1}] @ G^l^T`` plus its own block on its rows.
        """
        rnns = self.chain.rnns
        size = self.chain.state_size
        at_cols: list[tf.Tensor] = []
        bt_cols: list[tf.Tensor] = []
        off = 0
        for li, (rnn, u, s) in enumerate(zip(rnns, us, prev, strict=True)):
            at_own, but = linearize_cell(rnn, u, s)            # (N, S_l, S_l), (N, U_l, S_l)
            own = tf.pad(at_own, [[0, 0], [off, size - off - rnn.size], [0, 0]])
            n_u = rnn.in_size
            if li == 0:
                bt_cols.append(tf.matmul(self._per_step_t(rnn.before, x, n_u), but))
                at_cols.append(own)
            else:
                below = rnns[li - 1]
                g_t = tf.matmul(self._per_step_t(rnn.before, _cell_out(below, new[li - 1]), n_u),
                                but)                            # (N, H_{l-1}, S_l)
                at_cols.append(tf.matmul(at_cols[-1][:, :, :below.out_size], g_t) + own)
                bt_cols.append(tf.matmul(bt_cols[-1][:, :, :below.out_size], g_t))
            off += rnn.size
        last = rnns[-1]
        c_t = self._per_step_t(self.chain.head, _cell_out(last, new[-1]), self.f_out)
        ct = tf.pad(c_t, [[0, 0], [size - last.size, last.size - last.out_size], [0, 0]])
        at, bt = tf.concat(at_cols, axis=2), tf.concat(bt_cols, axis=2)
        mask = self._mask(x)
        if mask is not None:   # a masked step: every state carried (A = I), no input (B = 0)
            m = mask[:, :, None]
            at = tf.where(m, at, tf.eye(size, dtype=at.dtype))
            bt = tf.where(m, bt, tf.zeros_like(bt))
            if last.layer.zero_output_for_mask:   # and the head sees zeros
                ct = tf.where(m, ct, tf.zeros_like(ct))
        return at, bt, ct

    def _per_step_t(self, layers: Sequence[keras.layers.Layer], rows: tf.Tensor,
                    n_out: int) -> tf.Tensor:
        """``(d layers(row) / d row)^T``: ``(N, F, n_out)``; the identity without layers."""
        closed = per_step_jacobian_t(layers, rows, n_out)
        if closed is not None:
            return closed
        return tf.transpose(rowwise_jacobian(layers, rows, n_out), [0, 2, 1])

    def _chunk(self, k: int, propagate: bool) -> Any:
        if (k, propagate) not in self._chunk_fns:
            sig = [tf.TensorSpec([None, None, self.chain.state_size], self.dtype),
                   tf.TensorSpec([None, k, self.f_in], self.dtype),
                   [tf.TensorSpec([None, k, r.in_size], self.dtype) for r in self.chain.rnns],
                   [tf.TensorSpec([None, k, r.size], self.dtype) for r in self.chain.rnns],
                   [tf.TensorSpec([None, k, r.size], self.dtype) for r in self.chain.rnns]]
            self._chunk_fns[k, propagate] = tf.function(
                lambda z, x, us, prev, new: self._chunk_body(z, x, us, prev, new, k, propagate),
                input_signature=sig, autograph=False)
        return self._chunk_fns[k, propagate]

    def _chunk_body(self, z: tf.Tensor, x: tf.Tensor, us: list[tf.Tensor],
                    prev: list[tf.Tensor], new: list[tf.Tensor], k: int,
                    propagate: bool) -> tuple[Any, ...]:
        """Sweep ``k`` steps ``t0..t0+k-1``; ``z`` holds the old columns ``Z_{t0-1}^T``.

        Returns ``Z_{t0+k-1}^T`` (old columns, then the chunk's), the old columns'
        rows ``(E, n, k * F_out)``, the chunk's own rows flat ``(E, k (k + 1) / 2
        * F_in, F_out)`` (step ``j``'s ``(j + 1) F_in`` columns after step ``j -
        1``'s), the number of leading old columns now exactly zero for every
        example, and whether every ``A`` was finite (dropping zero columns is
        exact only then: ``0 * inf`` is NaN).
        """
        self.traces += 1
        e = tf.shape(x)[0]
        size, f_in, f_out = self.chain.state_size, self.f_in, self.f_out

        def rows(v: tf.Tensor) -> tf.Tensor:   # step-major: step j's rows are contiguous
            return tf.reshape(tf.transpose(v, [1, 0, 2]), [k * e, v.shape[-1]])

        at, bt, ct = self._linearize(rows(x), [rows(u) for u in us], [rows(p) for p in prev],
                                     [rows(v) for v in new])
        # one Unpack op per operand (slicing step by step would trace 4 ops per slice)
        a_j = tf.unstack(tf.reshape(at, [k, e, size, size]), num=k)
        b_j = tf.unstack(tf.reshape(bt, [k, e, f_in, size]), num=k)
        c_j = tf.unstack(tf.reshape(ct, [k, e, size, f_out]), num=k)
        if propagate:
            p_last, w, own, f_last, finite = propagated(a_j, b_j, c_j, size)
            j_old, z_old = tf.matmul(z, w), tf.matmul(z, p_last)
        else:
            z_old, j_old, own, f_last, finite = stepwise(z, a_j, b_j, c_j)
        nonzero = tf.reduce_any(tf.not_equal(z_old, 0), axis=[0, 2])
        # leading columns exactly zero for every example: no non-zero among them so far
        lead = tf.reduce_sum(tf.cast(tf.equal(tf.cumsum(tf.cast(nonzero, tf.int32)), 0),
                                     tf.int32))
        return tf.concat([z_old, f_last], axis=1), j_old, own, lead, finite

    # -- calling ----------------------------------------------------------
    def __call__(self, x: np.ndarray, idx: np.ndarray, in_len: int | None = None,
                 in_steps: tuple[int, int] | None = None) -> Computed:
        idx = np.asarray(idx, dtype=np.int64)
        in_len = x.shape[1] if in_len is None else int(in_len)
        sw = self._sweep
        if sw is None or not sw.continues(x, int(idx[0])):
            sw = self._sweep = _Sweep(self, x)
        out = sw.rows(idx, in_len)
        # The forward pass ran over the whole sequence (once per slab).
        return out, (x.shape[0], sw.t_out, self.f_out), x.shape[1]

    def tiny(self, x: np.ndarray) -> Computed:
        """Output step 0's row of the Jacobian (traces the forward pass and a chunk).

        The chain is causal and keeps its inputs' length, so the row needs only
        the first chunk of steps swept, not a forward pass over a long sample.
        """
        head = x[:, :min(x.shape[1], CHUNK)]
        out, (e, _, f_out), _ = self(head, np.array([0]), x.shape[1])
        return out, (e, int(x.shape[1]), f_out), int(x.shape[1])

    def blocks(self, plan: Plan, pending: Sequence[Block],
               read: Callable[[Block], np.ndarray]) -> Iterator[tuple[Block, Computed]]:
        """The pending blocks in order, each slab of examples swept once."""
        try:
            yield from super().blocks(plan, pending, read)
        finally:
            self._sweep = None    # the sweep's arrays go with the run

    # -- checks and costs -----------------------------------------------------
    def check(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Refuse (NotApplicable, with the evidence) a decomposition that is not the model.

        On the prefix ``x`` the eager checks ran the model on: the decomposed
        forward pass must reproduce the model's outputs to float32 rounding, and
        the Jacobian must match ordinary reverse-mode gradients of the model
        (which also confirms it is causal). The layers were matched one by one:
        each acts on one step or is a forward recurrence, so what holds on the
        prefix holds at any length. ``y``: the model's outputs on ``x`` where the
        eager checks computed them already. A chain with a Masking layer is also
        checked on a copy of ``x`` with masked steps (inside and at the end).
        """
        self._check_on(x, y, "")
        if self.chain.mask_value is not None and x.shape[1] >= 4:
            xm = np.array(x)
            t = x.shape[1]
            xm[:, [1, t // 2, t // 2 + 1]] = self.chain.mask_value
            xm[1:, t - 2:] = self.chain.mask_value           # a padded tail
            self._check_on(xm, None, " with masked steps")
        self._sweep = None

    def _check_on(self, x: np.ndarray, y: np.ndarray | None, which: str) -> None:
        sw = _Sweep(self, x)
        ref_y = y
        if ref_y is None or ref_y.shape != sw.y.shape:
            with tf.device(self.device):
                ref_y = np.asarray(call_model(self.call, tf.constant(x)))
        close_or_refuse(sw.y, ref_y, "the decomposed forward pass does not reproduce the "
                         f"model's outputs{which}", "a layer does more than its known "
                         "per-step or recurrent form")
        mine = sw.rows(np.arange(x.shape[1]), x.shape[1])
        ref = reverse_reference(self.call, x, self.f_out, self.device)
        close_or_refuse(mine, ref, "the decomposed Jacobian differs from reverse-mode "
                         f"gradients of the model on the first {x.shape[1]} steps{which}", "")

    def cost_model(self) -> CostModel:
        """The working memory of a block, from the shapes (nothing to probe).

        Per example and input step: the forward pass's inputs and states (NumPy
        and TensorFlow copies), the swept columns and the rows waiting to be
        asked for; per Jacobian row and input step, the block being assembled;
        fixed, the chunk's matrices for every example of the batch.
        """
        size = self.chain.state_size
        u = sum(r.in_size for r in self.chain.rnns)
        k = chunk_for(size, self.batch_hint, self.f_in)
        per_step = 4 * (3 * (size + u) + 4 * size * self.f_in + 3 * k * self.f_out * self.f_in)
        fixed = 16 * 2**20 + self.batch_hint * k * 4 * (8 * size * size
                                                       + 4 * k * self.f_in * size)
        return CostModel(fixed=float(fixed), per_step=float(per_step),
                         per_row_step=float(8 * self.f_in), measured=False)

    def block_work(self, plan: Plan, block: Block) -> float:
        """Floating-point operations of the sweep through ``block``'s steps (auto's trial).

        Per example and step: the chunk's small products (``S^3`` for a
        propagator, ``k S^2 F_in`` for the chunk's own columns) and the old
        columns (``n (S^2 / k + S F_out)`` with ``n`` columns carried; counted
        without the exact zeros that the sweep drops, so an upper bound).
        """
        size = self.chain.state_size
        k = chunk_for(size, block.examples[1] - block.examples[0], self.f_in)
        p0, p1 = block.positions
        first = plan.out_steps[p0 - 1] + 1 if p0 > 0 else 0
        steps = np.arange(first, plan.out_steps[p1 - 1] + 1, dtype=np.float64)
        n = steps * self.f_in
        per = size ** 3 + k * size * size * self.f_in + n * (size * size / k + size * self.f_out)
        return float((block.examples[1] - block.examples[0]) * per.sum())

    def record(self) -> dict[str, Any]:
        return {"sensitivity_chain": self.chain.describe()}

    def run_info(self) -> dict[str, Any]:
        """For the run record: the (column, step) pairs carried, those dropped as exactly zero,
        and the widest lag carried (past it, every column of ds/dx was exactly zero)."""
        return {"sensitivity": {"column_steps_carried": int(self.swept_columns),
                                "column_steps_dropped_as_zero": int(self.dropped_columns),
                                "widest_lag_carried": int(self.widest_lag)}}


def _cell_out(rnn: Recurrent, s: tf.Tensor) -> tf.Tensor:
    return s[:, :rnn.out_size]


class _Sweep:
    """One slab of examples swept forward in time, one chunk of steps per traced call."""

    def __init__(self, fn: Sensitivity, x: np.ndarray) -> None:
        t0 = time.perf_counter()
        self.fn, self.x = fn, np.ascontiguousarray(x, dtype=fn.spec.dtype)
        with tf.device(fn.device), grappler_off():
            us, ss, init, y = fn._forward_fn(tf.constant(self.x))
        self.us = [u.numpy() for u in us]
        self.ss = [s.numpy() for s in ss]
        self.init = [i.numpy()[:, None, :] for i in init]
        self.y = y.numpy()
        self.t_out = int(self.y.shape[1])
        self.z = tf.zeros([self.x.shape[0], 0, fn.chain.state_size], fn.dtype)
        self.lo = 0          # first input step still carried in z
        self.t = 0           # next step to sweep
        self.pending: dict[int, tuple[int, np.ndarray]] = {}   # step -> (lo, its rows)
        self.k, self.propagate = fn.modes(self.x.shape)
        fn.setup_seconds = time.perf_counter() - t0

    def continues(self, x: np.ndarray, first: int) -> bool:
        """Whether the rows from step ``first`` on can be had by sweeping on."""
        return ((first >= self.t or first in self.pending) and x.shape == self.x.shape
                and np.array_equal(x, self.x))

    def _advance(self) -> None:
        """Sweep the next chunk of steps; keep every step's rows until they are asked for.

        The last chunk of the sequence is padded to the traced length by repeating
        the last step (one trace serves every chunk); the padded rows are dropped.
        """
        fn = self.fn
        t0, k = self.t, self.k
        real = min(k, self.x.shape[1] - t0)

        def window(a: np.ndarray, start: int, first: np.ndarray | None = None) -> np.ndarray:
            w = a[:, max(start, 0):start + k]
            if start < 0 and first is not None:  # the states before step 0: the initial ones
                w = np.concatenate([first, w], axis=1)
            if w.shape[1] < k:
                w = np.concatenate([w, np.repeat(w[:, -1:], k - w.shape[1], axis=1)], axis=1)
            return w

        prev = [window(s, t0 - 1, i) for s, i in zip(self.ss, self.init, strict=True)]
        with tf.device(fn.device), grappler_off():
            z, j_old, j_new, lead, finite = fn._chunk(k, self.propagate)(
                self.z, window(self.x, t0), [window(u, t0) for u in self.us], prev,
                [window(s, t0) for s in self.ss])
        f_in, f_out = fn.f_in, fn.f_out
        e = self.x.shape[0]
        n_old = int(j_old.shape[1])
        # rows of step t0 + j: old columns (input steps lo..t0-1), then the chunk's
        j_old = j_old.numpy().reshape(e, n_old, k, f_out)
        j_new = j_new.numpy()
        for j in range(real):
            off = f_in * j * (j + 1) // 2          # step j's own columns in the flat rows
            row = np.concatenate([j_old[:, :, j, :], j_new[:, off:off + (j + 1) * f_in]],
                                 axis=1)
            self.pending[t0 + j] = (self.lo, row)
        n_steps = n_old // f_in
        drop = int(lead) // f_in if bool(finite) else 0
        fn.swept_columns += n_steps * real
        fn.dropped_columns += (self.lo + drop) * real
        self.z = z[:, drop * f_in:] if drop else z
        self.lo += drop
        self.t = t0 + real
        # steps back from the chunk's last step to the oldest column still carried
        fn.widest_lag = max(fn.widest_lag, self.t - 1 - self.lo)

    def rows(self, idx: np.ndarray, in_len: int) -> np.ndarray:
        """``J[:, idx, :, :in_len, :]`` of this slab, sweeping as far as needed."""
        fn = self.fn
        e = self.x.shape[0]
        out = np.zeros((e, len(idx), fn.f_out, in_len, fn.f_in), fn.spec.dtype)
        last = int(idx[-1])
        while self.t <= last:
            self._advance()
        for a, step in enumerate(idx):
            lo, row = self.pending[int(step)]
            cols = row.reshape(e, -1, fn.f_in, fn.f_out)          # (E, steps, F_in, F_out)
            hi = min(in_len, lo + cols.shape[1])
            if hi > lo:
                out[:, a, :, lo:hi, :] = np.transpose(cols[:, :hi - lo], (0, 3, 1, 2))
        for step in [s for s in self.pending if s <= last]:
            del self.pending[step]
        return out
