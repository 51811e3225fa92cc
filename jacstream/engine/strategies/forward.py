"""``forward``: forward mode over blocks of input steps (columns of the Jacobian).

``(t1 - t0) * F_in`` copies of each example, each carrying a one-hot tangent,
and one Jacobian-vector product for all of them. It is done with
``tf.autodiff.ForwardAccumulator`` where that can trace the model
("accumulator"), else as the transpose of a vector-Jacobian product
(``d/du <J^T u, v>``: two reverse passes, "transpose"), which also works through
Keras RNN loops where the accumulator fails (TensorList ops have no forward
rule). Validation picks the implementation; it is part of the function's spec.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ...errors import ModelError
from .._tf import tf
from ..models import step_outputs
from .base import BlockFunction

__all__ = ["Forward"]

_ZERO = tf.UnconnectedGradients.ZERO


class Forward(BlockFunction):
    """Forward mode: blocks of input steps, by one of two implementations."""

    axis: ClassVar[str] = "in"
    impls: ClassVar[tuple[str, ...]] = ("accumulator", "transpose")
    optional: ClassVar[bool] = True

    def body(self, x: tf.Tensor, idx: tf.Tensor, t0: tf.Tensor,  # type: ignore[override]
             t1: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        self.traces += 1
        xt, tangent, b, n = self._tangents(x, t0, t1)
        if self.spec.impl == "accumulator":
            with tf.autodiff.ForwardAccumulator(xt, tangent) as acc:
                yb, yshape = self.model_outputs(xt, idx)
            return self._columns(acc.jvp(yb, unconnected_gradients=_ZERO), yshape, b, n, idx)
        # J v = d/du <J^T u, v>: J^T u is linear in u, so its derivative along v
        # does not depend on u (zeros here) and is exact.
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(xt)
                yb, yshape = self.model_outputs(xt, idx)
            u = tf.zeros_like(yb)
            outer.watch(u)
            vjp = inner.gradient(yb, xt, output_gradients=u, unconnected_gradients=_ZERO)
        if vjp is None:
            raise self.no_gradient()
        jvp = outer.gradient(vjp, u, output_gradients=tangent, unconnected_gradients=_ZERO)
        return self._columns(jvp, yshape, b, n, idx)

    def _tangents(self, x: tf.Tensor, t0: tf.Tensor,
                  t1: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(t1-t0)*F_in`` copies of each example and their one-hot tangents."""
        f_in = self.spec.f_in
        b, length = tf.shape(x)[0], tf.shape(x)[1]
        n = t1 - t0
        r = n * f_in
        xt = tf.repeat(x, r, axis=0)
        one_hot = tf.reshape(tf.eye(r, dtype=x.dtype), [r, n, f_in])
        tangent = tf.tile(tf.pad(one_hot, [[0, 0], [t0, length - t1], [0, 0]]), [b, 1, 1])
        return xt, tangent, b, n

    def _columns(self, jvp: tf.Tensor | None, yshape: tf.Tensor, b: tf.Tensor, n: tf.Tensor,
                 idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if jvp is None:
            raise self.no_gradient()
        k = tf.shape(idx)[0]
        shape = [b, n, self.spec.f_in, k, self.spec.f_out]
        jac = tf.transpose(tf.reshape(jvp, shape), [0, 3, 4, 1, 2])
        return jac, tf.tensor_scatter_nd_update(yshape, [[0]], [b])

    def record(self) -> dict[str, Any]:
        return {"forward_impl": self.spec.impl}

    def check(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Raise ModelError unless forward mode agrees with a reverse-mode gradient.

        A weighted sum of the first input step's columns must equal the gradient
        of the same weighted sum of the outputs (one ordinary backward pass):
        forward mode through an op with a custom or incomplete derivative could
        otherwise give zeros or wrong values without an error.
        """
        length = x.shape[1]
        xt = tf.constant(x)
        with tf.device(self.spec.device), tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(xt)
            y = step_outputs(self.call, xt)    # as many output steps as x gives, not T_in
            w = np.random.default_rng(3).uniform(0.5, 1.5, size=y.shape[1:]).astype(x.dtype)
            total = tf.reduce_sum(y * w)
        g = tape.gradient(total, xt)
        cols, _, _ = self(x, np.arange(y.shape[1]), length, (0, 1))   # (b, T_out, F_out, 1, F_in)
        fwd = np.einsum("btfj,tf->bj", cols[:, :, :, 0, :], w)
        rev = np.zeros_like(fwd) if g is None else np.asarray(g)[:, 0, :]
        scale = max(float(np.max(np.abs(rev))), float(np.max(np.abs(fwd))), 1e-30)
        if not np.allclose(fwd, rev, rtol=1e-4, atol=1e-5 * scale):
            raise ModelError(
                f"forward mode ({self.impl}) disagrees with reverse mode on this model (by up "
                f"to {float(np.max(np.abs(fwd - rev))):.3g}, scale {scale:.3g}): an op with a "
                "custom or incomplete derivative")
