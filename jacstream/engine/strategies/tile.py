"""``tile``: reverse mode over copies of each example, one ordinary gradient per block."""

from __future__ import annotations

from typing import ClassVar

from .._tf import tf
from .base import BlockFunction

__all__ = ["Tile"]


class Tile(BlockFunction):
    """``len(idx) * F_out`` copies of each example and one gradient of ``sum(y * one_hot)``.

    Copy r yields row r. Needs examples that do not interact (checked before).
    """

    impls: ClassVar[tuple[str, ...]] = ("tile",)

    def body(self, x: tf.Tensor, idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:  # type: ignore[override]
        # K*F_out copies of each example, one ordinary gradient of sum(y * one_hot):
        # copy r of example i yields row r of example i's Jacobian. Exact only
        # for models whose examples do not interact (checked before running).
        self.traces += 1
        f_out = self.spec.f_out
        b, length, f_in = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
        k = tf.shape(idx)[0]
        r = k * f_out
        xt = tf.repeat(x, r, axis=0)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(xt)
            yb, yshape = self.model_outputs(xt, idx)     # (b*r, k, F_out)
            yb = tf.reshape(yb, [b, r, r])
            loss = tf.reduce_sum(yb * tf.eye(r, dtype=yb.dtype)[None])
        g = tape.gradient(loss, xt, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if g is None:
            raise self.no_gradient()
        yshape = tf.tensor_scatter_nd_update(yshape, [[0]], [b])
        return tf.reshape(g, [b, k, f_out, length, f_in]), yshape
