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
* Nothing is assumed: :func:`decompose` matches the layers against a known set,
  the decomposed forward pass must reproduce the model's outputs to float32
  rounding, and :meth:`SensitivityFunction.verify` compares a short prefix of
  the Jacobian with ordinary reverse-mode gradients.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ._plan import CostModel  # noqa: E402
from ._tf import StrategyUnavailable  # noqa: E402

__all__ = ["Chain", "NotApplicable", "SensitivityFunction", "build", "decompose"]

# Steps linearised and swept per traced call: long enough to amortise the call,
# short enough that the unrolled graph traces in well under a second.
CHUNK = 32
# Bound on the chunk's own matrices (A, the propagators, their products) for the batch.
CHUNK_BYTES = 192 * 2**20

# Layers that act on each step alone (on the last axis), at inference.
_PER_STEP = (keras.layers.Dense, keras.layers.Dropout, keras.layers.Activation,
             keras.layers.LayerNormalization, keras.layers.ReLU, keras.layers.LeakyReLU,
             keras.layers.ELU, keras.layers.PReLU, keras.layers.Softmax,
             keras.layers.GaussianNoise, keras.layers.GaussianDropout,
             keras.layers.AlphaDropout, keras.layers.Identity)


class NotApplicable(StrategyUnavailable):
    """The model is not a chain this strategy can decompose; the message says why."""


# --------------------------------------------------------------------------- decomposition
@dataclass
class _Recurrent:
    layer: keras.layers.Layer
    before: list[keras.layers.Layer]   # per-step layers between the previous stage and this
    sizes: tuple[int, ...] = ()        # sizes of the cell's states, in the cell's order
    in_size: int = 0                   # features of the cell's per-step input

    @property
    def cell(self) -> Any:
        return self.layer.cell

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def out_size(self) -> int:         # the cell's output is its first state
        return self.sizes[0]


@dataclass
class Chain:
    """A model seen as per-step layers around forward recurrent layers."""

    rnns: list[_Recurrent]
    head: list[keras.layers.Layer]
    names: list[str] = field(default_factory=list)

    @property
    def state_size(self) -> int:
        return sum(r.size for r in self.rnns)

    def describe(self) -> str:
        return " -> ".join(self.names)


def _state_sizes(cell: Any) -> tuple[int, ...]:
    size = cell.state_size
    sizes = list(size) if isinstance(size, (list, tuple)) else [size]
    out: list[int] = []
    for s in sizes:
        if isinstance(s, (list, tuple)) or not isinstance(s, (int, np.integer)):
            raise NotApplicable(f"the cell {type(cell).__name__} has a state of shape {s!r}; "
                                "only flat states (an int or a list of ints) are supported")
        out.append(int(s))
    return tuple(out)


def _is_per_step(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, keras.layers.TimeDistributed):
        return _is_per_step(layer.layer)
    if isinstance(layer, keras.layers.LayerNormalization):
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        return list(axis) in ([-1], [2])
    if isinstance(layer, keras.layers.Softmax):
        return layer.axis in (-1, 2) if isinstance(layer.axis, int) else False
    if isinstance(layer, keras.layers.BatchNormalization):
        return layer.axis in (-1, 2)
    return isinstance(layer, _PER_STEP)


def _chain_layers(model: Any) -> list[keras.layers.Layer]:
    """The layers of a Sequential or single-path functional model, in order."""
    if not isinstance(model, keras.Model):
        raise NotApplicable("the model is a plain callable, not a Keras model: its layers "
                            "cannot be matched")
    if isinstance(model, keras.Sequential):
        return list(model.layers)
    if not hasattr(model, "_operations") or len(model.inputs) != 1 or len(model.outputs) != 1:
        raise NotApplicable("only Sequential and single-input, single-output functional "
                            "models are decomposed")
    by_depth = getattr(model, "_nodes_by_depth", None)
    if not by_depth:
        raise NotApplicable("the model's layer graph cannot be read")
    layers: list[keras.layers.Layer] = []
    prev = None
    for depth in sorted(by_depth, reverse=True):     # from the input to the output
        nodes = by_depth[depth]
        if len(nodes) != 1:
            raise NotApplicable(f"the model branches ({len(nodes)} layers at one depth)")
        node = nodes[0]
        layer = node.operation
        if isinstance(layer, keras.layers.InputLayer):
            prev = node.output_tensors[0]
            continue
        if len(node.input_tensors) != 1 or node.input_tensors[0] is not prev:
            raise NotApplicable(f"layer {layer.name!r} does not take exactly the previous "
                                "layer's output: not a single chain")
        layers.append(layer)
        prev = node.output_tensors[0]
    if prev is not model.outputs[0]:
        raise NotApplicable("the model's output is not the last layer's output")
    return layers


def decompose(model: Any) -> Chain:
    """Match ``model`` against ``per-step -> RNN -> per-step -> ... -> per-step``.

    Raises :class:`NotApplicable` with the first reason it is not such a chain.
    """
    rnns: list[_Recurrent] = []
    pending: list[keras.layers.Layer] = []
    names: list[str] = []
    for layer in _chain_layers(model):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        name = f"{type(layer).__name__}({layer.name})"
        if isinstance(layer, keras.layers.Bidirectional):
            raise NotApplicable(f"{name} runs backwards in time: not a forward recurrence")
        if isinstance(layer, keras.layers.RNN):
            for attr, bad, why in (("go_backwards", True, "runs backwards in time"),
                                   ("stateful", True, "is stateful"),
                                   ("return_sequences", False, "does not return sequences"),
                                   ("return_state", True, "returns its states")):
                if bool(getattr(layer, attr, not bad)) == bad:
                    raise NotApplicable(f"{name} {why}")
            cell = layer.cell
            if isinstance(cell, keras.layers.StackedRNNCells):
                raise NotApplicable(f"{name} has stacked cells (StackedRNNCells)")
            rnns.append(_Recurrent(layer, pending, _state_sizes(cell),
                                   int(layer.input.shape[-1])))
            pending = []
        elif isinstance(layer, keras.layers.Masking) or getattr(layer, "supports_masking",
                                                                False) is None:
            raise NotApplicable(f"{name} masks steps")
        elif _is_per_step(layer):
            pending.append(layer)
        else:
            raise NotApplicable(f"{name} is neither a forward RNN nor a known per-step layer")
        names.append(name)
    if not rnns:
        raise NotApplicable("the model has no recurrent layer")
    return Chain(rnns, pending, names)


_BUILTIN_RNNS = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)
_BUILTIN_STEPS = (keras.layers.Dense, keras.layers.Dropout, keras.layers.Activation,
                  keras.layers.LayerNormalization, keras.layers.ReLU, keras.layers.LeakyReLU,
                  keras.layers.ELU, keras.layers.Softmax, keras.layers.GaussianNoise,
                  keras.layers.GaussianDropout, keras.layers.AlphaDropout,
                  keras.layers.Identity, keras.layers.BatchNormalization)


def _builtin_activation(fn: Any) -> bool:
    return fn is None or str(getattr(fn, "__module__", "")).startswith("keras.src.activations")


def builtin_chain(model: Any) -> tuple[bool, str]:
    """Whether ``model`` is a chain of Keras' own per-step and forward recurrent layers only.

    Exact types (no subclasses), Keras activations only. Such a model cannot mix
    examples, is deterministic at inference, differentiable, and causal, by the
    layers' own definitions: the eager checks that establish this numerically
    for other models can be skipped. Returns ``(ok, why)``.
    """
    try:
        chain = decompose(model)
    except NotApplicable as e:
        return False, str(e)
    layers = [r.layer for r in chain.rnns] + [la for r in chain.rnns for la in r.before] \
        + list(chain.head)
    for la in layers:
        inner = la.layer if type(la) is keras.layers.TimeDistributed else la
        if type(inner) not in _BUILTIN_RNNS + _BUILTIN_STEPS:
            return False, f"{type(inner).__name__}({inner.name}) is not one of Keras' own layers"
        for attr in ("activation", "recurrent_activation"):
            if not _builtin_activation(getattr(inner, attr, None)):
                return False, f"{inner.name} has a custom {attr}"
    return True, ("a chain of Keras' own per-step and forward recurrent layers ("
                  + chain.describe() + ")")


# --------------------------------------------------------------------------- numerics
def _apply(layers: Sequence[keras.layers.Layer], rows: tf.Tensor) -> tf.Tensor:
    """Per-step layers on rows ``(N, F)``: each row is one step of one example."""
    if not layers:
        return rows
    y = rows[:, None, :]
    for layer in layers:
        y = layer(y, training=False)
    return y[:, 0, :]


def _rowwise_jacobian(layers: Sequence[keras.layers.Layer], rows: tf.Tensor,
                      n_out: int) -> tf.Tensor:
    """``d layers(row) / d row`` for every row: ``(N, n_out, F)``, by tiled reverse mode."""
    n = tf.shape(rows)[0]
    rep = tf.repeat(rows, n_out, axis=0)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(rep)
        y = _apply(layers, rep)
        loss = tf.reduce_sum(tf.reshape(y, [n, n_out, n_out]) * tf.eye(n_out, dtype=y.dtype))
    g = tape.gradient(loss, rep, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return tf.reshape(g, [n, n_out, tf.shape(rows)[1]])


def _with_derivative(fn: Callable[[tf.Tensor], tf.Tensor], z: tf.Tensor,
                     ) -> tuple[tf.Tensor, tf.Tensor]:
    """``fn(z)`` and its elementwise derivative (Keras activations act elementwise)."""
    if fn is None:
        return z, tf.ones_like(z)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(z)
        a = fn(z)
    return a, tape.gradient(a, z, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _scaled(coef: Sequence[tf.Tensor], mats: Sequence[tf.Tensor]) -> tf.Tensor:
    """``sum_g coef_g[n, a] * mats_g[b, a]``: shape ``(N, B, A)``."""
    out = coef[0][:, None, :] * mats[0][None]
    for c, m in zip(coef[1:], mats[1:], strict=True):
        out += c[:, None, :] * m[None]
    return out


def _gates(m: tf.Tensor, n_gates: int) -> list[tf.Tensor]:
    return tf.split(m, n_gates, axis=-1)


def _lstm(cell: Any, u: tf.Tensor, h: tf.Tensor, c: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Closed-form ``(AT, BuT)`` of a Keras ``LSTMCell`` (states ``[h, c]``)."""
    z = tf.matmul(u, cell.kernel) + tf.matmul(h, cell.recurrent_kernel)
    if cell.use_bias:
        z += cell.bias
    zi, zf, zc, zo = _gates(z, 4)
    i, di = _with_derivative(cell.recurrent_activation, zi)
    f, df = _with_derivative(cell.recurrent_activation, zf)
    g, dg = _with_derivative(cell.activation, zc)
    o, do = _with_derivative(cell.recurrent_activation, zo)
    c_new = f * c + i * g
    ac, dac = _with_derivative(cell.activation, c_new)
    k_i, k_f, k_c, k_o, m = di * g, df * c, dg * i, do * ac, o * dac

    def blocks(w: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        wi, wf, wc, wo = _gates(w, 4)
        dc = _scaled([k_i, k_f, k_c], [wi, wf, wc])            # d c' / d (h or u), transposed
        dh = m[:, None, :] * dc + k_o[:, None, :] * wo[None]     # d h' / d (h or u), transposed
        return dh, dc

    dh_h, dc_h = blocks(cell.recurrent_kernel)
    dh_u, dc_u = blocks(cell.kernel)
    diag_f = tf.linalg.diag(f)
    at = tf.concat([tf.concat([dh_h, dc_h], axis=2),
                    tf.concat([tf.linalg.diag(m * f), diag_f], axis=2)], axis=1)
    return at, tf.concat([dh_u, dc_u], axis=2)


def _gru(cell: Any, u: tf.Tensor, h: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Closed-form ``(AT, BuT)`` of a Keras ``GRUCell`` with ``reset_after=True``."""
    mx = tf.matmul(u, cell.kernel)
    mh = tf.matmul(h, cell.recurrent_kernel)
    if cell.use_bias:
        mx += cell.bias[0]
        mh += cell.bias[1]
    xz, xr, xh = _gates(mx, 3)
    hz, hr, hh_ = _gates(mh, 3)
    z, dz = _with_derivative(cell.recurrent_activation, xz + hz)
    r, dr = _with_derivative(cell.recurrent_activation, xr + hr)
    cand, dcand = _with_derivative(cell.activation, xh + r * hh_)
    c_z = (h - cand) * dz
    c_r = (1 - z) * dcand * dr * hh_
    c_h = (1 - z) * dcand
    uz, ur, uh = _gates(cell.recurrent_kernel, 3)
    wz, wr, wh = _gates(cell.kernel, 3)
    at = _scaled([c_z, c_r, c_h * r], [uz, ur, uh]) + tf.linalg.diag(z)
    return at, _scaled([c_z, c_r, c_h], [wz, wr, wh])


def _simple(cell: Any, u: tf.Tensor, h: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Closed-form ``(AT, BuT)`` of a Keras ``SimpleRNNCell``."""
    pre = tf.matmul(u, cell.kernel) + tf.matmul(h, cell.recurrent_kernel)
    if cell.bias is not None:
        pre += cell.bias
    _, d = _with_derivative(cell.activation, pre)
    return d[:, None, :] * cell.recurrent_kernel[None], d[:, None, :] * cell.kernel[None]


def _generic(rnn: _Recurrent, u: tf.Tensor, s: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(AT, BuT)`` of any cell by tiled reverse mode: one row per state output."""
    n, size = tf.shape(s)[0], rnn.size
    ur, sr = tf.repeat(u, size, axis=0), tf.repeat(s, size, axis=0)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch([ur, sr])
        new = _cell_step(rnn, ur, sr)
        loss = tf.reduce_sum(tf.reshape(new, [n, size, size]) * tf.eye(size, dtype=new.dtype))
    gu, gs = tape.gradient(loss, [ur, sr], unconnected_gradients=tf.UnconnectedGradients.ZERO)
    # rows: output a, columns: input b; transposed to (N, b, a)
    return (tf.transpose(tf.reshape(gs, [n, size, size]), [0, 2, 1]),
            tf.transpose(tf.reshape(gu, [n, size, tf.shape(u)[1]]), [0, 2, 1]))


def _cell_step(rnn: _Recurrent, u: tf.Tensor, s: tf.Tensor) -> tf.Tensor:
    """One step of the cell on flat states: ``s' = step(u, s)``, states concatenated.

    Called as Keras' RNN layer calls it: the states as a list, ``training`` only
    where the cell's ``call`` takes it.
    """
    states = tf.split(s, list(rnn.sizes), axis=-1) if len(rnn.sizes) > 1 else [s]
    kwargs = {"training": False} if getattr(rnn.cell, "_call_has_training_arg", False) else {}
    _, new = rnn.cell(u, states, **kwargs)
    new = tf.nest.flatten(new)
    return tf.concat(new, axis=-1) if len(new) > 1 else new[0]


def _linearize_cell(rnn: _Recurrent, u: tf.Tensor, s: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    cell = rnn.cell
    kind = type(cell)
    if kind is keras.layers.LSTMCell:
        h, c = tf.split(s, list(rnn.sizes), axis=-1)
        return _lstm(cell, u, h, c)
    if kind is keras.layers.GRUCell and cell.reset_after:
        return _gru(cell, u, s)
    if kind is keras.layers.SimpleRNNCell:
        return _simple(cell, u, s)
    return _generic(rnn, u, s)


# --------------------------------------------------------------------------- the function
class SensitivityFunction:
    """Block function of the ``"sensitivity"`` strategy (same calling convention as pfor's).

    ``fn(x, idx, in_len)`` returns ``(J, y_shape, in_len)`` with ``J`` of shape
    ``(examples, len(idx), F_out, in_len, F_in)``. Blocks of one slab of examples
    are computed by one sweep that is carried from call to call: called with
    the next output steps of the same inputs it continues where it stopped;
    with other inputs, or earlier steps, it starts again from step 0 (which is
    how a resumed run skips the blocks already stored).
    """

    strategy = "sensitivity"
    impl = "sensitivity"
    static = False
    forward_mode = False

    def __init__(self, model: Any, chain: Chain, f_in: int, f_out: int, device: str,
                 dtype: tf.DType = tf.float32, reference: Callable[[Any], Any] | None = None,
                 ) -> None:
        self.model, self.chain = model, chain
        # The model's own call path: the decomposed forward pass must reproduce it.
        self.reference = reference if reference is not None else model
        self._reference_fn = tf.function(
            lambda v: tf.convert_to_tensor(_call(self.reference, v)),
            input_signature=[tf.TensorSpec([None, None, int(f_in)], dtype)])
        self.f_in, self.f_out = int(f_in), int(f_out)
        self.device, self.dtype = device, dtype
        self.notes: list[str] = []
        self.t_out = 0
        self.traces = 0
        self.static_block = 1
        self.static_idx = 0
        self.propagate = True         # sweep old columns by chunk propagators (see _chunk_body)
        self.dropped_columns = 0      # columns of Z dropped as exactly zero, summed over steps
        self.swept_columns = 0        # columns of Z carried, summed over steps
        self._sweep: _Sweep | None = None
        self._forward_fn = tf.function(self._forward, input_signature=[
            tf.TensorSpec([None, None, self.f_in], dtype)], autograph=False)
        self._chunk_fns: dict[int, Any] = {}
        self.chunk = CHUNK
        self.batch_hint = 1           # examples the cost model plans for (build() sets it)
        self.setup_seconds = 0.0      # the last sweep's start: its forward pass

    # -- traced pieces ----------------------------------------------------
    def _forward(self, x: tf.Tensor) -> tuple[list[tf.Tensor], ...]:
        """Every stage's per-step inputs and states ``(E, T, .)``, and the head's output."""
        self.traces += 1
        e, t = tf.shape(x)[0], tf.shape(x)[1]
        feed, width = x, self.f_in
        us, ss, inits = [], [], []
        for rnn in self.chain.rnns:
            u = tf.reshape(_apply(rnn.before, tf.reshape(feed, [e * t, width])),
                           [e, t, rnn.in_size])
            s, s0 = self._scan(rnn, u)
            inits.append(s0)
            us.append(u)
            ss.append(s)
            feed, width = s[:, :, :rnn.out_size], rnn.out_size
        y = _apply(self.chain.head, tf.reshape(feed, [e * t, width]))
        return us, ss, inits, tf.reshape(y, [e, t, -1])

    def _scan(self, rnn: _Recurrent, u: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        e, t = tf.shape(u)[0], tf.shape(u)[1]
        init = tf.zeros([e, rnn.size], u.dtype)
        if hasattr(rnn.cell, "get_initial_state"):
            st = tf.nest.flatten(rnn.cell.get_initial_state(batch_size=e))
            init = tf.concat([tf.cast(v, u.dtype) for v in st], axis=-1)
        ut = tf.transpose(u, [1, 0, 2])
        ta = tf.TensorArray(u.dtype, size=t)

        def body(k: tf.Tensor, s: tf.Tensor, ta: tf.TensorArray) -> tuple[Any, ...]:
            s = _cell_step(rnn, ut[k], s)
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
            at_own, but = _linearize_cell(rnn, u, s)            # (N, S_l, S_l), (N, U_l, S_l)
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
        c_t = tf.transpose(_rowwise_jacobian(self.chain.head, _cell_out(last, new[-1]),
                                             self.f_out), [0, 2, 1])   # (N, H_L, F_out)
        ct = tf.pad(c_t, [[0, 0], [size - last.size, last.size - last.out_size], [0, 0]])
        return tf.concat(at_cols, axis=2), tf.concat(bt_cols, axis=2), ct

    def _per_step_t(self, layers: Sequence[keras.layers.Layer], rows: tf.Tensor,
                    n_out: int) -> tf.Tensor:
        """``(d layers(row) / d row)^T``: ``(N, F, n_out)``; the identity without layers."""
        if not layers:
            return tf.eye(n_out, batch_shape=[tf.shape(rows)[0]], dtype=rows.dtype)
        return tf.transpose(_rowwise_jacobian(layers, rows, n_out), [0, 2, 1])

    def _chunk(self, k: int) -> Any:
        if k not in self._chunk_fns:
            sig = [tf.TensorSpec([None, None, self.chain.state_size], self.dtype),
                   tf.TensorSpec([None, k, self.f_in], self.dtype),
                   [tf.TensorSpec([None, k, r.in_size], self.dtype) for r in self.chain.rnns],
                   [tf.TensorSpec([None, k, r.size], self.dtype) for r in self.chain.rnns],
                   [tf.TensorSpec([None, k, r.size], self.dtype) for r in self.chain.rnns]]
            self._chunk_fns[k] = tf.function(
                lambda z, x, us, prev, new: self._chunk_body(z, x, us, prev, new, k),
                input_signature=sig, autograph=False)
        return self._chunk_fns[k]

    def _chunk_body(self, z: tf.Tensor, x: tf.Tensor, us: list[tf.Tensor],
                    prev: list[tf.Tensor], new: list[tf.Tensor], k: int) -> tuple[Any, ...]:
        """Sweep ``k`` steps ``t0..t0+k-1``; ``z`` holds the old columns ``Z_{t0-1}^T``.

        Old columns move through the chunk's propagator ``P_j = A_j ... A_0``:
        ``J_j(old) = C_j P_j Z_{t0-1}`` and ``Z_{t0+k-1}(old) = P_{k-1} Z_{t0-1}``,
        so the wide ``(n, S)`` operand is multiplied twice per chunk instead of
        once per step (``k S^3`` for the small products against ``k n S^2``).
        When ``n <= S`` that would cost more, and ``z`` is swept step by step.
        The chunk's own columns are swept step by step (they are few).

        Returns ``Z_{t0+k-1}^T`` (old columns, then the chunk's), the old columns'
        rows ``(E, n, k * F_out)``, the chunk's own ``(E, k, k * F_in, F_out)``,
        the number of leading old columns now exactly zero, and whether every
        ``A`` was finite.
        """
        self.traces += 1
        e = tf.shape(x)[0]
        size, f_in, f_out = self.chain.state_size, self.f_in, self.f_out
        dt = self.dtype

        def rows(v: tf.Tensor) -> tf.Tensor:
            return tf.reshape(v, [e * k, v.shape[-1]])

        at, bt, ct = self._linearize(rows(x), [rows(u) for u in us], [rows(p) for p in prev],
                                     [rows(v) for v in new])
        at = tf.reshape(at, [e, k, size, size])
        bt = tf.reshape(bt, [e, k, f_in, size])
        ct = tf.reshape(ct, [e, k, size, f_out])
        # inj[:, j]: step j's input columns placed among the chunk's k * F_in columns
        inj = tf.reshape(tf.einsum("jm,ejfs->ejmfs", tf.eye(k, dtype=dt), bt),
                         [e, k, k * f_in, size])
        n_old = tf.shape(z)[1]
        at_k = tf.transpose(at, [1, 0, 2, 3])                   # (k, E, S, S): at_k[j] contiguous
        inj_k = tf.transpose(inj, [1, 0, 2, 3])

        def loop(body: Callable[..., tuple[Any, ...]], init: tuple[Any, ...]) -> tuple[Any, ...]:
            return tf.while_loop(lambda j, *_: j < k, body, (tf.constant(1), *init))[1:]

        if self.propagate:
            def step(j: tf.Tensor, p: tf.Tensor, f: tf.Tensor, ps: Any, fs: Any) -> tuple:
                p = tf.matmul(p, at_k[j])
                f = tf.matmul(f, at_k[j]) + inj_k[j]
                return j + 1, p, f, ps.write(j, p), fs.write(j, f)

            ta = [tf.TensorArray(dt, size=k, element_shape=[None, size, size]),
                  tf.TensorArray(dt, size=k, element_shape=[None, k * f_in, size])]
            p, _, ps, fs = loop(step, (at_k[0], inj_k[0], ta[0].write(0, at_k[0]),
                                       ta[1].write(0, inj_k[0])))
            w = tf.matmul(tf.transpose(ps.stack(), [1, 0, 2, 3]), ct)    # (E, k, S, F_out)
            w = tf.reshape(tf.transpose(w, [0, 2, 1, 3]), [e, size, k * f_out])
            j_old, z_old = tf.matmul(z, w), tf.matmul(z, p)
        else:
            ct_k = tf.transpose(ct, [1, 0, 2, 3])

            def step_z(j: tf.Tensor, zj: tf.Tensor, f: tf.Tensor, jo: Any, fs: Any) -> tuple:
                zj = tf.matmul(zj, at_k[j])
                f = tf.matmul(f, at_k[j]) + inj_k[j]
                return j + 1, zj, f, jo.write(j, tf.matmul(zj, ct_k[j])), fs.write(j, f)

            z0 = tf.matmul(z, at_k[0])
            ta = [tf.TensorArray(dt, size=k, element_shape=[None, None, f_out]),
                  tf.TensorArray(dt, size=k, element_shape=[None, k * f_in, size])]
            z_old, _, jo, fs = loop(step_z, (z0, inj_k[0], ta[0].write(0, tf.matmul(z0, ct_k[0])),
                                           ta[1].write(0, inj_k[0])))
            j_old = tf.reshape(tf.transpose(jo.stack(), [1, 2, 0, 3]), [e, n_old, k * f_out])
        fs = tf.transpose(fs.stack(), [1, 0, 2, 3])                      # (E, k, k F_in, S)
        j_new = tf.matmul(fs, ct)                                        # (E, k, k F_in, F_out)
        nonzero = tf.reduce_any(tf.not_equal(z_old, 0), axis=[0, 2])
        lead = tf.cond(tf.reduce_any(nonzero),
                       lambda: tf.cast(tf.argmax(tf.cast(nonzero, tf.int32)), tf.int32),
                       lambda: n_old)
        finite = tf.reduce_all(tf.math.is_finite(at))
        return tf.concat([z_old, fs[:, -1]], axis=1), j_old, j_new, lead, finite

    # -- calling ----------------------------------------------------------
    def __call__(self, x: np.ndarray, idx: np.ndarray, in_len: int | None = None,
                 ) -> tuple[np.ndarray, tuple[int, ...], int]:
        idx = np.asarray(idx, dtype=np.int64)
        in_len = x.shape[1] if in_len is None else int(in_len)
        sw = self._sweep
        if sw is None or not sw.continues(x, int(idx[0])):
            sw = self._sweep = _Sweep(self, x)
        out = sw.rows(idx, in_len)
        # The forward pass ran over the whole sequence (once per slab).
        return out, (x.shape[0], sw.t_out, self.f_out), x.shape[1]

    # -- checks -------------------------------------------------------------
    def validate(self, sample: np.ndarray, short: np.ndarray,
                 short_shape: tuple[int, ...], short_y: np.ndarray | None = None) -> int:
        """Check the decomposition on a prefix of the user's inputs; return the output length.

        On the prefix ``short`` (the one the eager checks ran the model on, whose
        outputs are ``short_y``), the decomposed forward pass must reproduce the
        model's outputs to float32 rounding, and the Jacobian must match ordinary
        reverse-mode gradients of the model (which also confirms it is causal).
        Raises :class:`NotApplicable` with the evidence otherwise. The layers
        were matched one by one (:func:`decompose`): each acts on one step, or is
        a forward recurrence, so what holds on the prefix holds at any length.
        """
        if tuple(short_shape) != (short.shape[0], short.shape[1], self.f_out):
            raise NotApplicable(f"the model maps {short.shape[1]} input steps to "
                                f"{short_shape[1]} output steps: not one output per step")
        sw = _Sweep(self, short)
        self.check_outputs(short, sw.y, short_y)
        mine = sw.rows(np.arange(short.shape[1]), short.shape[1])
        ref = _reverse_reference(self.reference, short, self.f_out, self.device)
        scale = max(float(np.max(np.abs(ref))), 1e-30)
        err = float(np.max(np.abs(mine - ref)))
        if not np.allclose(mine, ref, rtol=1e-4, atol=1e-5 * scale):
            raise NotApplicable(
                f"the decomposed Jacobian differs from reverse-mode gradients of the model on "
                f"the first {short.shape[1]} steps (by up to {err:.3g}, scale {scale:.3g})")
        self.t_out = sample.shape[1]
        return self.t_out

    def check_outputs(self, x: np.ndarray, y: np.ndarray, ref: np.ndarray | None = None) -> None:
        """Raise NotApplicable unless ``y`` (decomposed) matches the model's output on ``x``."""
        if ref is None:
            with tf.device(self.device):
                ref = self._reference_fn(tf.constant(x)).numpy()
        if ref.shape != y.shape:
            raise NotApplicable(f"the decomposed forward pass gives outputs of shape {y.shape}, "
                                f"the model {ref.shape}")
        scale = max(float(np.max(np.abs(ref))), 1e-30)
        if not np.allclose(y, ref, rtol=1e-4, atol=1e-5 * scale):
            raise NotApplicable(
                "the decomposed forward pass does not reproduce the model's outputs (by up to "
                f"{float(np.max(np.abs(y - ref))):.3g}, scale {scale:.3g}): a layer does more "
                "than its known per-step or recurrent form")

    def probe_cost(self, x: np.ndarray, max_len: int = 512) -> CostModel:
        """The working memory of a block, from the shapes (nothing to probe).

        Per example and input step: the forward pass's inputs and states (NumPy
        and TensorFlow copies) and the swept columns; per Jacobian row and input
        step, the rows waiting to be asked for; fixed, the chunk's matrices for
        every example of the batch.
        """
        size = self.chain.state_size
        u = sum(r.in_size for r in self.chain.rnns)
        k = self.chunk
        per_step = 4 * (3 * (size + u) + 4 * size * self.f_in + 3 * k * self.f_out * self.f_in)
        fixed = 16 * 2**20 + self.batch_hint * k * 4 * (8 * size * size
                                                       + 4 * k * self.f_in * size)
        return CostModel(fixed=float(fixed), per_step=float(per_step),
                         per_row_step=float(8 * self.f_in), measured=False)

    def block_work(self, plan: Any, block: Any) -> float:
        """Floating-point operations of the sweep through ``block``'s steps (for auto's trial).

        Per example and step: the chunk's small products (``S^3`` for a
        propagator, ``k S^2 F_in`` for the chunk's own columns) and the old
        columns (``n (S^2 / k + S F_out)`` with ``n`` columns carried; counted
        without the exact zeros that the sweep drops, so an upper bound).
        """
        size, k = self.chain.state_size, self.chunk
        p0, p1 = block.positions
        first = plan.out_steps[p0 - 1] + 1 if p0 > 0 else 0
        steps = np.arange(first, plan.out_steps[p1 - 1] + 1, dtype=np.float64)
        n = steps * self.f_in
        per = size ** 3 + k * size * size * self.f_in + n * (size * size / k + size * self.f_out)
        return float((block.examples[1] - block.examples[0]) * per.sum())

    def start(self, x: np.ndarray) -> _Sweep:
        """A new sweep over inputs ``x`` (forward pass and its reproduction check)."""
        return _Sweep(self, x)


def _call(model: Any, x: Any) -> Any:
    return model(x, training=False) if isinstance(model, keras.Model) else model(x)


def _reverse_reference(call: Any, x: np.ndarray, f_out: int, device: str) -> np.ndarray:
    """``J`` of ``x`` by ordinary gradients: one copy of each example per Jacobian row."""
    b, t, f_in = x.shape
    r = t * f_out
    xt = tf.constant(np.repeat(x, r, axis=0))
    with tf.device(device), tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(xt)
        y = tf.convert_to_tensor(_call(call, xt))
        loss = tf.reduce_sum(tf.reshape(y, [b, r, r]) * tf.eye(r, dtype=y.dtype))
    g = tape.gradient(loss, xt, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return g.numpy().reshape(b, t, f_out, t, f_in)


def chunk_for(state_size: int, batch: int, f_in: int = 1) -> int:
    """Steps per traced chunk: :data:`CHUNK`, fewer where the chunk's matrices (``k x batch
    x S^2`` floats, several times) would pass :data:`CHUNK_BYTES`.

    Depends on the shapes only, so that every process of a job (the client and
    each dask worker) cuts the same chunks and computes the same bits.
    """
    per_step = batch * 4 * (8 * state_size * state_size + 4 * CHUNK * f_in * state_size)
    return int(max(1, min(CHUNK, CHUNK_BYTES // max(per_step, 1))))


def build(model: Any, call: Callable[[Any], Any], f_in: int, f_out: int, device: str,
          batch: int, t_in: int) -> SensitivityFunction:
    """The sensitivity block function of ``model``; NotApplicable if it cannot be decomposed."""
    try:
        chain = decompose(model)
    except NotApplicable as e:
        raise NotApplicable(
            f"strategy='sensitivity' does not apply to this model: {e}. It needs per-step "
            "layers around forward RNN layers that return sequences; use strategy='auto' "
            "(or 'pfor', 'tile').") from None
    fn = SensitivityFunction(model, chain, f_in, f_out, device, reference=call)
    fn.batch_hint = int(batch)
    fn.chunk = chunk_for(chain.state_size, batch, f_in)
    # Wide states on short sequences: the chunk's propagators would cost more than
    # sweeping the columns step by step (see _chunk_body).
    fn.propagate = t_in > chain.state_size
    return fn


def _cell_out(rnn: _Recurrent, s: tf.Tensor) -> tf.Tensor:
    return s[:, :rnn.out_size]


class _Sweep:
    """One slab of examples swept forward in time, one chunk of steps per traced call."""

    def __init__(self, fn: SensitivityFunction, x: np.ndarray) -> None:
        t0 = time.perf_counter()
        self.fn, self.x = fn, np.ascontiguousarray(x, dtype=np.float32)
        with tf.device(fn.device):
            us, ss, init, y = fn._forward_fn(tf.constant(self.x))
        self.us = [u.numpy() for u in us]
        self.ss = [s.numpy() for s in ss]
        self.init = [i.numpy()[:, None, :] for i in init]
        self.y = y.numpy()
        self.t_out = int(self.y.shape[1])
        self.z = tf.zeros([self.x.shape[0], 0, fn.chain.state_size], tf.float32)
        self.lo = 0          # first input step still carried in z
        self.t = 0           # next step to sweep
        self.pending: dict[int, tuple[int, np.ndarray]] = {}   # step -> (lo, its rows)
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
        t0, k = self.t, fn.chunk
        real = min(k, self.x.shape[1] - t0)

        def window(a: np.ndarray, start: int, first: np.ndarray | None = None) -> np.ndarray:
            w = a[:, max(start, 0):start + k]
            if start < 0 and first is not None:  # the states before step 0: the initial ones
                w = np.concatenate([first, w], axis=1)
            if w.shape[1] < k:
                w = np.concatenate([w, np.repeat(w[:, -1:], k - w.shape[1], axis=1)], axis=1)
            return w

        prev = [window(s, t0 - 1, i) for s, i in zip(self.ss, self.init, strict=True)]
        with tf.device(fn.device):
            z, j_old, j_new, lead, finite = fn._chunk(k)(
                self.z, window(self.x, t0), [window(u, t0) for u in self.us], prev,
                [window(s, t0) for s in self.ss])
        f_in, f_out = fn.f_in, fn.f_out
        e = self.x.shape[0]
        n_old = int(j_old.shape[1])
        # rows of step t0 + j: old columns (input steps lo..t0-1), then the chunk's
        j_old = j_old.numpy().reshape(e, n_old, k, f_out)
        j_new = j_new.numpy()
        for j in range(real):
            row = np.concatenate([j_old[:, :, j, :], j_new[:, j, :(j + 1) * f_in]], axis=1)
            self.pending[t0 + j] = (self.lo, row)
        n_steps = n_old // f_in
        drop = int(lead) // f_in if bool(finite) else 0
        fn.swept_columns += n_steps * real
        fn.dropped_columns += (self.lo + drop) * real
        self.z = z[:, drop * f_in:] if drop else z
        self.lo += drop
        self.t = t0 + real

    def rows(self, idx: np.ndarray, in_len: int) -> np.ndarray:
        """``J[:, idx, :, :in_len, :]`` of this slab, sweeping as far as needed."""
        fn = self.fn
        e = self.x.shape[0]
        out = np.zeros((e, len(idx), fn.f_out, in_len, fn.f_in), np.float32)
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
