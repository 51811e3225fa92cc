"""Causality: ``causal="auto"`` decides it, ``causal=True`` is checked.

``"auto"`` is True only on structural and numerical evidence; a promise
(``causal=True``) is held to the same numerical check (``causal="trust"`` skips it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import events
from ..errors import ModelError
from ._tf import keras, tf
from .models import RNN_LAYERS, Pointwise, WithSide, side_rows, step_outputs

__all__ = ["check_causal_promise", "detect_causal"]

# Layers whose output at step t depends on inputs at steps <= t only.
_CAUSAL_RNN = RNN_LAYERS
_STEPWISE = (keras.layers.Dense, keras.layers.Activation, keras.layers.Dropout,
             keras.layers.InputLayer, keras.layers.LayerNormalization, keras.layers.ReLU,
             keras.layers.LeakyReLU, keras.layers.PReLU, keras.layers.ELU, keras.layers.Softmax,
             keras.layers.Add, keras.layers.Multiply, keras.layers.Subtract,
             keras.layers.Average, keras.layers.Maximum, keras.layers.Minimum,
             keras.layers.GaussianNoise, keras.layers.GaussianDropout,
             keras.layers.SpatialDropout1D, keras.layers.Rescaling, Pointwise)


def _layer_is_causal(layer: keras.layers.Layer) -> tuple[bool, str]:
    name = f"{layer.__class__.__name__}({layer.name})"
    if isinstance(layer, keras.layers.Bidirectional):
        return False, f"{name} reads the sequence backwards"
    if isinstance(layer, _CAUSAL_RNN):
        if getattr(layer, "go_backwards", False):
            return False, f"{name} has go_backwards=True"
        if not getattr(layer, "return_sequences", True):
            return False, f"{name} returns only its last step"
        return True, ""
    if isinstance(layer, keras.layers.Conv1D):
        if layer.padding == "causal" or layer.kernel_size[0] == 1:
            return True, ""
        return False, f"{name} has padding={layer.padding!r} (only 'causal' looks back only)"
    if isinstance(layer, keras.layers.TimeDistributed):
        inner = layer.layer
        if isinstance(inner, keras.Model):
            return _model_is_causal(inner)
        return _layer_is_causal(inner) if not isinstance(inner, _CAUSAL_RNN) else (True, "")
    if isinstance(layer, keras.layers.LayerNormalization):
        axes = list(np.atleast_1d(layer.axis))
        return (axes in ([-1], [2])), f"{name} normalises over axis {layer.axis}"
    if isinstance(layer, keras.layers.Concatenate):
        return (layer.axis in (-1, 2)), f"{name} concatenates along axis {layer.axis}"
    if isinstance(layer, _STEPWISE):
        return True, ""
    if isinstance(layer, keras.Model):
        return _model_is_causal(layer)
    return False, f"{name} is not a layer jacstream knows to be causal"


def _model_is_causal(model: keras.Model) -> tuple[bool, str]:
    for layer in model.layers:
        ok, why = _layer_is_causal(layer)
        if not ok:
            return False, why
    return True, ""


def _is_graph_model(model: Any) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, (Functional, keras.Sequential))


def detect_causal(model: Any, call: Callable[[Any], Any], x: np.ndarray,
                  device: str) -> tuple[bool, str]:
    """Decide ``causal="auto"``: True only on structural *and* numerical evidence.

    Structure: a functional or Sequential Keras model made only of layers known
    to look back only (forward RNNs returning sequences, causal Conv1D, per-step
    layers). Numbers: the exact Jacobian of one example at a few output steps
    has no non-zero entry above the diagonal. A plain callable or a subclassed
    model is never judged causal (its code cannot be inspected).
    """
    with events.phase("detect_causal"), side_rows(call, 0, x.shape[0]):
        model = model.model if isinstance(model, WithSide) else model
        if not _is_graph_model(model):
            return False, "not a functional/Sequential Keras model: cannot inspect its layers"
        ok, why = _model_is_causal(model)
        if not ok:
            return False, why
        out_len, found = _look_ahead(call, x, device)
        if out_len != x.shape[1]:
            return False, f"output has {out_len} steps for {x.shape[1]} input steps"
        if found is not None:
            return False, (f"output step {found.out_step} depends on input step "
                           f"{found.in_step} (checked numerically)")
        return True, "every layer looks back only, and the Jacobian is zero above the diagonal"


def check_causal_promise(call: Callable[[Any], Any], x: np.ndarray, device: str) -> str:
    """Check ``causal=True`` numerically; why it holds, or ModelError with the evidence.

    The same check as ``"auto"``'s numbers, without its judgement of the layers:
    the Jacobian of one example at a few output steps of ``x`` (a prefix of the
    inputs) must be exactly zero above the diagonal. A broken promise would
    make a causal run leave out non-zero entries: a silently wrong Jacobian.
    """
    with events.phase("detect_causal"), side_rows(call, 0, x.shape[0]):
        out_len, found = _look_ahead(call, x, device)
    length = x.shape[1]
    if out_len != length:
        raise ModelError(f"causal=True: the model maps the first {length} input steps to "
                         f"{out_len} output steps, so there is no diagonal to check causality "
                         "against. Use causal=False.")
    if found is None:
        return (f"set by the caller (causal=True), and the Jacobian is zero above the "
                f"diagonal at output steps {list(_steps(length))} of the first {length} steps "
                "(checked numerically)")
    raise ModelError(
        f"causal=True promises that output step t depends only on input steps <= t, but "
        f"this model's output step {found.out_step} depends on the later input step "
        f"{found.in_step}: d y[0, {found.out_step}, :] / d x[0, {found.in_step}, :] reaches "
        f"{found.value:.3g} (the largest entry at input steps <= {found.out_step} is "
        f"{found.scale:.3g}; checked on the first {length} steps of example 0). A causal run "
        "would leave out those entries and return a wrong Jacobian. Pass causal='auto' (or "
        "False), or make the model causal (e.g. use_causal_mask=True in MultiHeadAttention, "
        "padding='causal' in Conv1D); causal='trust' skips this check.")


@dataclass(frozen=True)
class _LookAhead:
    """Evidence that output step ``out_step`` depends on the later ``in_step``."""

    out_step: int
    in_step: int
    value: float   # the largest |d y[0, out_step, :] / d x[0, in_step, :]|
    scale: float   # the largest |d y[0, out_step, :] / d x[0, :out_step + 1, :]|


def _steps(length: int) -> list[int]:
    return sorted({0, length // 3, length // 2, max(0, length - 2)})


def _look_ahead(call: Callable[[Any], Any], x: np.ndarray,
                device: str) -> tuple[int, _LookAhead | None]:
    """The model's output steps on ``x[:1]``, and the first checked output step with a
    non-zero entry above the diagonal (None: none; not looked for when the lengths differ).

    One backward pass per checked step, of a weighted sum of its output features
    (random positive weights: features cannot cancel); on a find, that step's
    exact entries.
    """
    length = x.shape[1]
    xt = tf.constant(np.ascontiguousarray(x[:1]))
    steps = _steps(length)
    with tf.device(device), tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        tape.watch(xt)
        y = step_outputs(call, xt)
        if y.shape[1] != length:
            return int(y.shape[1]), None
        w = np.random.default_rng(5).uniform(0.5, 1.5, size=(len(steps), y.shape[2]))
        outs = [y[0, t, :] for t in steps]
        rows = [tf.reduce_sum(o * w[i].astype(o.dtype.as_numpy_dtype))
                for i, o in enumerate(outs)]
    for t, o, r in zip(steps, outs, rows, strict=True):
        g = tape.gradient(r, xt)
        if g is None or not np.any(np.asarray(g)[0, t + 1:]):
            continue
        exact = np.abs(np.asarray(tape.jacobian(o, xt))[:, 0])   # (F_out, T, F_in)
        per_step = exact.max(axis=(0, 2))
        later = t + 1 + int(np.argmax(per_step[t + 1:]))
        return length, _LookAhead(t, later, float(per_step[later]),
                                  float(per_step[: t + 1].max()))
    return length, None
