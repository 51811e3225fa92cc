"""Recurrent models seen as one recurrence: which layers a chain is made of, and its pieces.

:func:`decompose` matches a Keras model against ``per-step layers -> forward
RNN -> per-step layers -> ... -> per-step layers`` (the chain the sensitivity
strategy sweeps, see :mod:`.strategies.sensitivity`); :func:`builtin_chain`
says whether such a chain is made of Keras' own layers only. The helpers apply
per-step layers to rows (one row per example and step), differentiate them
row by row, and run one step of a cell on flat states; :func:`reverse_reference` and
:func:`close_or_refuse` check a decomposition against the model's own gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import StrategyUnavailable
from ._tf import keras, tf
from .models import Pointwise, WithSide, call_model

__all__ = ["Chain", "NotApplicable", "Recurrent", "apply_steps", "builtin_chain", "cell_step",
           "close_or_refuse", "decompose", "reverse_reference", "rowwise_jacobian"]

# Layers that act on each step alone (on the last axis), at inference. Pointwise is
# jacstream's own TimeDistributed(Dense) rewrite (engine.models): the same Dense.
_PER_STEP = (keras.layers.Dense, keras.layers.Dropout, keras.layers.Activation,
             keras.layers.LayerNormalization, keras.layers.ReLU, keras.layers.LeakyReLU,
             keras.layers.ELU, keras.layers.PReLU, keras.layers.Softmax,
             keras.layers.GaussianNoise, keras.layers.GaussianDropout,
             keras.layers.AlphaDropout, keras.layers.Identity, Pointwise)


class NotApplicable(StrategyUnavailable):
    """The model is not a chain this strategy can decompose; the message says why."""


# --------------------------------------------------------------------------- decomposition
@dataclass
class Recurrent:
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

    rnns: list[Recurrent]
    head: list[keras.layers.Layer]
    names: list[str] = field(default_factory=list)
    # A Masking layer first: steps whose features all equal this value are masked (every
    # RNN carries its state through them, as Keras' RNN layers do with the mask).
    mask_value: float | None = None

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
    if isinstance(model, WithSide):
        raise NotApplicable("the model has several inputs; only single-input chains are "
                            "decomposed")
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
    # Tensors of ops outside layers: in a functional model, Keras computes a Masking
    # layer's mask with ops that feed the RNNs' mask inputs, beside the chain.
    beside: set[int] = set()
    for depth in sorted(by_depth, reverse=True):     # from the input to the output
        nodes = [n for n in by_depth[depth] if isinstance(n.operation, keras.layers.Layer)]
        beside.update(id(t) for n in by_depth[depth] if n not in nodes
                      for t in n.output_tensors)
        if len(nodes) > 1:
            raise NotApplicable(f"the model branches ({len(nodes)} layers at one depth)")
        if not nodes:
            continue
        node = nodes[0]
        layer = node.operation
        if isinstance(layer, keras.layers.InputLayer):
            prev = node.output_tensors[0]
            continue
        ins = node.input_tensors
        if not ins or ins[0] is not prev or any(id(t) not in beside for t in ins[1:]):
            raise NotApplicable(f"layer {layer.name!r} does not take exactly the previous "
                                "layer's output: not a single chain")
        if len(ins) > 1 and not any(type(la) is keras.layers.Masking for la in layers):
            raise NotApplicable(f"layer {layer.name!r} takes a mask that no Masking layer "
                                "made")
        layers.append(layer)
        prev = node.output_tensors[0]
    if prev is not model.outputs[0]:
        raise NotApplicable("the model's output is not the last layer's output")
    return layers


def decompose(model: Any) -> Chain:
    """Match ``model`` against ``per-step -> RNN -> per-step -> ... -> per-step``.

    Raises :class:`NotApplicable` with the first reason it is not such a chain.
    """
    rnns: list[Recurrent] = []
    pending: list[keras.layers.Layer] = []
    names: list[str] = []
    mask_value = None
    for layer in _chain_layers(model):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        name = f"{type(layer).__name__}({layer.name})"
        if type(layer) is keras.layers.Masking and not names:
            mask_value = float(layer.mask_value)
            names.append(name)
            continue
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
            inp = layer.input[0] if isinstance(layer.input, (list, tuple)) else layer.input
            rnns.append(Recurrent(layer, pending, _state_sizes(cell), int(inp.shape[-1])))
            pending = []
        elif isinstance(layer, keras.layers.Masking) or getattr(layer, "supports_masking",
                                                                False) is None:
            raise NotApplicable(f"{name} masks steps (only a Masking layer first is swept)")
        elif _is_per_step(layer):
            pending.append(layer)
        else:
            raise NotApplicable(f"{name} is neither a forward RNN nor a known per-step layer")
        names.append(name)
    if not rnns:
        raise NotApplicable("the model has no recurrent layer")
    return Chain(rnns, pending, names, mask_value)


_BUILTIN_RNNS = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)
_BUILTIN_STEPS = (keras.layers.Dense, keras.layers.Dropout, keras.layers.Activation,
                  keras.layers.LayerNormalization, keras.layers.ReLU, keras.layers.LeakyReLU,
                  keras.layers.ELU, keras.layers.Softmax, keras.layers.GaussianNoise,
                  keras.layers.GaussianDropout, keras.layers.AlphaDropout,
                  keras.layers.Identity, keras.layers.BatchNormalization)


def builtin_activation(fn: Any) -> bool:
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
            if not builtin_activation(getattr(inner, attr, None)):
                return False, f"{inner.name} has a custom {attr}"
    return True, ("a chain of Keras' own per-step and forward recurrent layers ("
                  + chain.describe() + ")")



def apply_steps(layers: Sequence[keras.layers.Layer], rows: tf.Tensor) -> tf.Tensor:
    """Per-step layers on rows ``(N, F)``: each row is one step of one example."""
    if not layers:
        return rows
    y = rows[:, None, :]
    for layer in layers:
        y = layer(y, training=False)
    return y[:, 0, :]


def rowwise_jacobian(layers: Sequence[keras.layers.Layer], rows: tf.Tensor,
                      n_out: int) -> tf.Tensor:
    """``d layers(row) / d row`` for every row: ``(N, n_out, F)``, by tiled reverse mode."""
    n = tf.shape(rows)[0]
    rep = tf.repeat(rows, n_out, axis=0)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(rep)
        y = apply_steps(layers, rep)
        loss = tf.reduce_sum(tf.reshape(y, [n, n_out, n_out]) * tf.eye(n_out, dtype=y.dtype))
    g = tape.gradient(loss, rep, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return tf.reshape(g, [n, n_out, tf.shape(rows)[1]])


def cell_step(rnn: Recurrent, u: tf.Tensor, s: tf.Tensor) -> tf.Tensor:
    """One step of the cell on flat states: ``s' = step(u, s)``, states concatenated.

    Called as Keras' RNN layer calls it: the states as a list, ``training`` only
    where the cell's ``call`` takes it.
    """
    states = tf.split(s, list(rnn.sizes), axis=-1) if len(rnn.sizes) > 1 else [s]
    kwargs = {"training": False} if getattr(rnn.cell, "_call_has_training_arg", False) else {}
    _, new = rnn.cell(u, states, **kwargs)
    new = tf.nest.flatten(new)
    return tf.concat(new, axis=-1) if len(new) > 1 else new[0]


def close_or_refuse(mine: np.ndarray, ref: np.ndarray, what: str, why: str) -> None:
    """Raise NotApplicable (saying ``what`` and ``why``) unless ``mine`` equals ``ref`` to
    float32 rounding."""
    if mine.shape != ref.shape:
        raise NotApplicable(f"{what}: shape {mine.shape}, the model's {ref.shape}")
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-30)
    if not np.allclose(mine, ref, rtol=1e-4, atol=1e-5 * scale):
        err = float(np.max(np.abs(mine - ref)))
        raise NotApplicable(f"{what} (by up to {err:.3g}, scale {scale:.3g})"
                            + (f": {why}" if why else ""))


def reverse_reference(call: Any, x: np.ndarray, f_out: int, device: str) -> np.ndarray:
    """``J`` of ``x`` by ordinary gradients: one copy of each example per Jacobian row."""
    b, t, f_in = x.shape
    r = t * f_out
    xt = tf.constant(np.repeat(x, r, axis=0))
    with tf.device(device), tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(xt)
        y = tf.convert_to_tensor(call_model(call, xt))
        loss = tf.reduce_sum(tf.reshape(y, [b, r, r]) * tf.eye(r, dtype=y.dtype))
    g = tape.gradient(loss, xt, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return g.numpy().reshape(b, t, f_out, t, f_in)
