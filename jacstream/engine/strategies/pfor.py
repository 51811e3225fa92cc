"""``pfor``: ``batch_jacobian`` of the block (vectorised reverse mode)."""

from __future__ import annotations

from typing import ClassVar

from .._tf import tf
from ..pfor import fast_pfor_tracing
from .base import BlockFunction

__all__ = ["Pfor"]


class Pfor(BlockFunction):
    """Reverse mode vectorised over the block's rows by TensorFlow's ``pfor``."""

    impls: ClassVar[tuple[str, ...]] = ("pfor",)

    def body(self, x: tf.Tensor, idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:  # type: ignore[override]
        self.traces += 1
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            yb, yshape = self.model_outputs(x, idx)
        # Outputs that truly do not move give zeros; models that are not differentiable
        # were refused before tracing (check_differentiable).
        with fast_pfor_tracing():
            jac = tape.batch_jacobian(yb, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if jac is None:
            raise self.no_gradient()
        return jac, yshape
