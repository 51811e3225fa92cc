"""Workloads: the models and inputs the benchmark differentiates.

A :class:`Workload` is a frozen, hashable description (architecture, sizes,
seed); it builds its Keras model and its inputs deterministically, so every
case process of a run sees the same model and the same data. This module
imports neither TensorFlow nor PyTorch nor JAX at import time: the runner and
the PyTorch and JAX case processes use it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

__all__ = ["ARCHS", "Workload", "reference", "useful_flops"]

ARCHS = ("lstm", "gru", "conv")


def useful_flops(arch: str, T: int, batch: int, H: int, F_in: int) -> int | None:
    """The arithmetic floor of a causal RNN's Jacobian, in flops; ``None`` for other archs.

    Each causal pair of steps ``t1 >= t2`` (``T (T + 1) / 2`` of them) costs a
    state-size square matrix-vector product, ``2 S^2`` flops, per example and
    input feature; ``S`` is the recurrent state: ``2H`` for an LSTM (h and c),
    ``H`` for a GRU (see the shared NOTES, "the arithmetic floor").

    >>> useful_flops("lstm", 1000, 10, 32, 1) / 1e9     # the reference model at T=1000
    41.00096
    >>> useful_flops("gru", 3, 1, 2, 5), useful_flops("conv", 3, 1, 2, 5)
    (240, None)
    """
    S = {"lstm": 2 * H, "gru": H}.get(arch)
    if S is None:
        return None
    return (T * (T + 1) // 2) * 2 * S * S * batch * F_in


@dataclass(frozen=True)
class Workload:
    """One model and one batch of inputs.

    ``arch`` is ``"lstm"`` or ``"gru"`` (``Input((None, F_in)) -> RNN(H,
    return_sequences=True) -> TimeDistributed(Dense(F_out))``) or ``"conv"``
    (two causal ``Conv1D(H, kernel)`` layers, the second dilated by 2, then the
    same head). ``name`` names the family: workloads that differ only in ``T``
    share it and are drawn as one line per method.

    Examples
    --------
    >>> w = Workload("lstm-h32", "lstm", T=300)
    >>> w.key, w.result_nbytes
    ('lstm-h32-T300', 3600000)
    >>> w.with_T(1000).key
    'lstm-h32-T1000'
    """

    name: str
    arch: str
    T: int
    batch: int = 10
    H: int = 32
    F_in: int = 1
    F_out: int = 1
    kernel: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for f in ("T", "batch", "H", "F_in", "F_out", "kernel"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)!r}")

    # -- identity ---------------------------------------------------------
    @property
    def key(self) -> str:
        """Unique name of this workload in a run: family name and length."""
        return f"{self.name}-T{self.T}"

    @property
    def result_nbytes(self) -> int:
        """Bytes of the dense float32 Jacobian ``(batch, T, F_out, T, F_in)``."""
        return self.batch * self.T * self.F_out * self.T * self.F_in * 4

    @property
    def useful_flops(self) -> int | None:
        """:func:`useful_flops` of this workload (``None`` when not recurrent)."""
        return useful_flops(self.arch, self.T, self.batch, self.H, self.F_in)

    def with_T(self, T: int) -> Workload:
        return replace(self, T=int(T))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        return cls(**d)

    def describe(self) -> str:
        layer = {"lstm": f"LSTM({self.H})", "gru": f"GRU({self.H})",
                 "conv": f"2x causal Conv1D({self.H}, {self.kernel})"}[self.arch]
        return (f"{layer} -> TimeDistributed(Dense({self.F_out})), F_in={self.F_in}, "
                f"batch {self.batch}")

    # -- data -------------------------------------------------------------
    def make_inputs(self) -> np.ndarray:
        """The inputs ``(batch, T, F_in)``, float32, from ``seed`` alone."""
        rng = np.random.default_rng([self.seed, self.T, self.F_in, 7])
        return rng.standard_normal((self.batch, self.T, self.F_in)).astype(np.float32)

    def sample_rows(self, n: int = 6) -> list[tuple[int, int]]:
        """Sampled ``(example, output step)`` pairs whose Jacobian rows are checked.

        Always the first and last output steps, plus random ones; each pair
        stands for the whole slice ``J[i, t1]`` (every output feature, input
        step and input feature).
        """
        rng = np.random.default_rng([self.seed, self.T, 11])
        pairs = {(0, self.T - 1), (self.batch - 1, 0), (self.batch // 2, self.T // 2)}
        while len(pairs) < min(n, self.batch * self.T):
            pairs.add((int(rng.integers(self.batch)), int(rng.integers(self.T))))
        return sorted(pairs)

    # -- model ------------------------------------------------------------
    def build_model(self, seed: int | None = None) -> Any:
        """Build the Keras model with weights drawn from ``seed`` (default: ``self.seed``)."""
        import keras

        keras.utils.set_random_seed(self.seed if seed is None else seed)
        inp = keras.Input((None, self.F_in))
        if self.arch == "lstm":
            h = keras.layers.LSTM(self.H, return_sequences=True)(inp)
        elif self.arch == "gru":
            h = keras.layers.GRU(self.H, return_sequences=True)(inp)
        else:
            h = keras.layers.Conv1D(self.H, self.kernel, padding="causal",
                                    activation="tanh")(inp)
            h = keras.layers.Conv1D(self.H, self.kernel, padding="causal", dilation_rate=2,
                                    activation="tanh")(h)
        out = keras.layers.TimeDistributed(keras.layers.Dense(self.F_out))(h)
        return keras.Model(inp, out, name=self.name.replace("-", "_"))


def reference(model: Any, x: np.ndarray,
              pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Exact Jacobian rows ``J[i, t1]`` for each sampled pair, by ordinary gradients.

    Every (pair, output feature) gets its own copy of example ``i`` in one
    batch; one ``tape.gradient`` of the sum of the selected outputs then gives
    every row at once, because examples do not interact. The same batch also
    carries ``x`` itself, so the one (slow, eager) forward pass gives the
    model's outputs too. Returns the rows, shape ``(len(pairs), F_out, T,
    F_in)``, and the outputs ``model(x)``.
    """
    import tensorflow as tf

    f_out = int(model.output_shape[-1])
    rows = [(i, t, f) for i, t in pairs for f in range(f_out)]
    b = x.shape[0]
    xr = tf.constant(np.concatenate([x, np.stack([x[i] for i, _, _ in rows])]))
    sel = np.zeros((b + len(rows), x.shape[1], f_out), np.float32)
    for r, (_, t, f) in enumerate(rows):
        sel[b + r, t, f] = 1.0
    with tf.GradientTape() as tape:
        tape.watch(xr)
        y = model(xr, training=False)
        loss = tf.reduce_sum(y * sel)
    g = tape.gradient(loss, xr).numpy()[b:]
    return g.reshape(len(pairs), f_out, x.shape[1], x.shape[2]), np.asarray(y)[:b]
