"""Causal detection for ``causal="auto"``: True only on structural and numerical evidence."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import events
from ._tf import keras, tf
from .models import RNN_LAYERS, Pointwise, WithSide, call_model, side_rows

__all__ = ["detect_causal"]

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
        return _detect(model.model if isinstance(model, WithSide) else model, call, x, device)


def _detect(model: Any, call: Callable[[Any], Any], x: np.ndarray,
            device: str) -> tuple[bool, str]:
    if not _is_graph_model(model):
        return False, "not a functional/Sequential Keras model: cannot inspect its layers"
    ok, why = _model_is_causal(model)
    if not ok:
        return False, why
    length = x.shape[1]
    probe = np.ascontiguousarray(x[:1])
    steps = sorted({0, length // 3, length // 2, max(0, length - 2)})
    xt = tf.constant(probe)
    with tf.device(device), tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        tape.watch(xt)
        y = call_model(call, xt)
        rows = [tf.reduce_sum(y[:, t, :]) for t in steps]
    if y.shape[1] != length:
        return False, f"output has {y.shape[1]} steps for {length} input steps"
    for t, r in zip(steps, rows, strict=True):
        g = tape.gradient(r, xt)
        if g is None:
            continue
        future = np.asarray(g)[0, t + 1:]
        if np.any(future != 0):
            return False, f"output step {t} depends on later input steps (checked numerically)"
    return True, "every layer looks back only, and the Jacobian is zero above the diagonal"
