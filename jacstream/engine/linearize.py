"""The linearisation of one recurrent step: ``ds'/ds`` and ``ds'/du`` for every row at once.

Rows are (example, step) pairs: each row's previous state ``s``, its input
``u``. Returned transposed, as the sensitivity sweep multiplies them:
``AT (N, S, S)`` with ``AT[n, b, a] = d s'_a / d s_b`` and ``BuT (N, U, S)``.
Keras' ``LSTMCell``, ``GRUCell`` (``reset_after=True``) and ``SimpleRNNCell``
in closed form from their gates (elementwise activations differentiated by
TensorFlow); any other cell by tiled reverse mode, one row per state output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._tf import keras, tf
from .recurrence import Recurrent, builtin_activation, cell_step

__all__ = ["linearize_cell"]


def _with_derivative(fn: Callable[[tf.Tensor], tf.Tensor], z: tf.Tensor,
                     ) -> tuple[tf.Tensor, tf.Tensor]:
    """``fn(z)`` and its elementwise derivative (Keras activations act elementwise)."""
    if fn is None or fn is keras.activations.linear:
        return z, tf.ones_like(z)
    # The two activations of every Keras RNN by default, in closed form (fewer ops to
    # trace and run than a tape); any other by TensorFlow's own derivative.
    if fn is keras.activations.sigmoid:
        a = tf.sigmoid(z)
        return a, a * (1 - a)
    if fn is keras.activations.tanh:
        a = tf.tanh(z)
        return a, 1 - a * a
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(z)
        a = fn(z)
    return a, tape.gradient(a, z, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _scaled(coef: Sequence[tf.Tensor], mats: Sequence[tf.Tensor]) -> tf.Tensor:
    """``sum_g coef_g[n, a] * mats_g[b, a]``: shape ``(N, B, A)``."""
    # expand_dims, not [:, None, :]: one op to trace instead of a slice and three constants
    out = tf.expand_dims(coef[0], 1) * mats[0]
    for c, m in zip(coef[1:], mats[1:], strict=True):
        out += tf.expand_dims(c, 1) * m
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
        dh = tf.expand_dims(m, 1) * dc + tf.expand_dims(k_o, 1) * wo   # d h' / d (h or u), T
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


def _generic(rnn: Recurrent, u: tf.Tensor, s: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(AT, BuT)`` of any cell by tiled reverse mode: one row per state output."""
    n, size = tf.shape(s)[0], rnn.size
    ur, sr = tf.repeat(u, size, axis=0), tf.repeat(s, size, axis=0)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch([ur, sr])
        new = cell_step(rnn, ur, sr)
        loss = tf.reduce_sum(tf.reshape(new, [n, size, size]) * tf.eye(size, dtype=new.dtype))
    gu, gs = tape.gradient(loss, [ur, sr], unconnected_gradients=tf.UnconnectedGradients.ZERO)
    # rows: output a, columns: input b; transposed to (N, b, a)
    return (tf.transpose(tf.reshape(gs, [n, size, size]), [0, 2, 1]),
            tf.transpose(tf.reshape(gu, [n, size, tf.shape(u)[1]]), [0, 2, 1]))


def linearize_cell(rnn: Recurrent, u: tf.Tensor, s: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
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


# Layers that are the identity at inference.
_IDENTITY_AT_INFERENCE = (keras.layers.Dropout, keras.layers.GaussianNoise,
                          keras.layers.GaussianDropout, keras.layers.AlphaDropout,
                          keras.layers.Identity)


def _unwrapped(layer: keras.layers.Layer) -> keras.layers.Layer:
    """The per-step layer inside ``TimeDistributed`` or jacstream's ``Pointwise``."""
    while type(layer) is keras.layers.TimeDistributed or hasattr(layer, "inner"):
        layer = layer.layer if type(layer) is keras.layers.TimeDistributed else layer.inner
    return layer


def _closed_form(layer: keras.layers.Layer) -> bool:
    la = _unwrapped(layer)
    if type(la) in _IDENTITY_AT_INFERENCE:
        return True
    if type(la) in (keras.layers.Dense, keras.layers.Activation):
        return builtin_activation(la.activation)
    return False


def per_step_jacobian_t(layers: Sequence[keras.layers.Layer], rows: tf.Tensor,
                        n_out: int) -> tf.Tensor | None:
    """``(d layers(row) / d row)^T`` for every row, ``(N, F, n_out)``, in closed form.

    For chains of Keras' ``Dense`` and ``Activation`` layers (Keras activations,
    which act elementwise) and layers that are the identity at inference: the
    kernels times the activations' derivatives, with no tape to trace. ``None``
    for any other layer (the caller differentiates those).
    """
    if not all(_closed_form(la) for la in layers):
        return None
    y, jt = rows, None                                     # jt: (N, F, width) or (F, width)
    for layer in layers:
        la = _unwrapped(layer)
        if type(la) in _IDENTITY_AT_INFERENCE:
            continue
        if type(la) is keras.layers.Dense:
            w = tf.cast(la.kernel, y.dtype)
            z = tf.matmul(y, w) + (tf.cast(la.bias, y.dtype) if la.use_bias else 0)
            jt = w if jt is None else tf.matmul(jt, w) if jt.shape.rank == 2 else \
                tf.einsum("nfw,wv->nfv", jt, w)
        else:
            z = y
        y, d = _with_derivative(la.activation, z)
        if la.activation not in (None, keras.activations.linear):
            jt = (tf.linalg.diag(d) if jt is None else jt * d[:, None, :] if jt.shape.rank == 3
                  else jt[None] * d[:, None, :])
    n, f = tf.shape(rows)[0], tf.shape(rows)[1]
    if jt is None:
        return tf.eye(f, batch_shape=[n], dtype=rows.dtype)
    if jt.shape.rank == 2:
        jt = tf.broadcast_to(jt[None], [n, f, n_out])
    return tf.reshape(jt, [n, f, n_out])
