"""Model preparation: a faster call path with identical outputs, and what kind of model it is."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._tf import keras, tf

__all__ = ["RNN_LAYERS", "Pointwise", "PreparedModel", "WithSide", "call_model", "compute_dtype",
           "forward", "model_kind", "prepare_model", "side_rows", "step_outputs",
           "without_cudnn"]

# Recurrent layers: a model with one is "recurrent" for the strategy prediction.
RNN_LAYERS = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN, keras.layers.RNN)


def call_model(call: Callable[[Any], Any], x: Any) -> Any:
    """``call(x)``, in inference mode where ``call`` is a Keras model."""
    return call(x, training=False) if isinstance(call, keras.Model) else call(x)


def forward(call: Callable[[Any], Any], x: np.ndarray, device: str) -> np.ndarray:
    """The model's outputs on ``x`` (eager, on ``device``) as a NumPy array."""
    with tf.device(device):
        y = call(x, training=False) if isinstance(call, keras.Model) else call(tf.constant(x))
    return np.asarray(y)


def compute_dtype(model: Any) -> str:
    """The dtype the model computes in: ``"float64"`` for a Keras model with a float64 layer,
    weight or input, else ``"float32"`` (also for plain callables, which cannot be inspected)."""
    inner = model.model if isinstance(model, WithSide) else model
    if not isinstance(inner, keras.layers.Layer):
        return "float32"
    subs = inner._flatten_layers(include_self=True, recursive=True)
    found = [getattr(s, "compute_dtype", None) for s in subs]
    found += [str(w.dtype) for w in inner.weights]
    found += [str(getattr(t, "dtype", "")) for t in (getattr(inner, "inputs", None) or [])]
    return "float64" if "float64" in found else "float32"


class WithSide:
    """A model of several inputs seen as a function of one of them (``wrt``).

    The other inputs ("side inputs") are held whole, ``side[name]`` with the
    examples on axis 0, and passed along with the examples being differentiated:
    :meth:`bound` gives the values for the examples of the call (NumPy slices,
    or the traced arguments of a block function). A call whose batch is a
    multiple of the bound examples repeats each one as ``tf.repeat`` does (the
    tile and forward strategies copy examples so); a shorter batch takes the
    first ones (a probe on the first example).
    """

    def __init__(self, model: Any, wrt: Any, side: dict[Any, np.ndarray], order: tuple[Any, ...],
                 form: str) -> None:
        self.model, self.wrt, self.side, self.order, self.form = model, wrt, side, order, form
        self.names = tuple(k for k in order if k != wrt)
        self._bound: list[tuple[Any, ...]] = []

    def rows(self, e0: int, e1: int) -> tuple[np.ndarray, ...]:
        """The side inputs of examples ``e0..e1-1``, in the order of :attr:`names`."""
        return tuple(np.ascontiguousarray(self.side[k][e0:e1]) for k in self.names)

    def with_model(self, model: Any) -> WithSide:
        """The same inputs for another model (a prepared clone); bound values are shared."""
        new = WithSide(model, self.wrt, self.side, self.order, self.form)
        new._bound = self._bound
        return new

    @contextmanager
    def bound(self, values: tuple[Any, ...]) -> Iterator[None]:
        self._bound.append(tuple(values))
        try:
            yield
        finally:
            self._bound.pop()

    def __call__(self, x: Any, training: bool = False) -> Any:
        if not self._bound:
            raise RuntimeError("jacstream: the model's side inputs were not bound to examples")
        x = tf.convert_to_tensor(x)
        values = dict(zip(self.names, (_matched(v, x) for v in self._bound[-1]), strict=True))
        values[self.wrt] = x
        if self.form == "dict":
            return call_model(self.model, values)
        ordered = [values[k] for k in self.order]
        return call_model(self.model, ordered if self.form == "list" else tuple(ordered))


def _matched(v: Any, x: tf.Tensor) -> tf.Tensor:
    """Side values ``v`` of n examples for a batch ``x`` of m: as is, the first m, or each
    repeated m / n times."""
    v = tf.convert_to_tensor(v)
    m, n = x.shape[0], v.shape[0]
    if m is not None and n is not None:
        if m == n:
            return v
        if m < n:
            return v[:m]
        if m % n:
            raise ValueError(f"a batch of {m} examples for side inputs of {n}")
        return tf.repeat(v, m // n, axis=0)
    return tf.repeat(v, tf.shape(x)[0] // tf.shape(v)[0], axis=0)


@contextmanager
def side_rows(call: Any, e0: int, e1: int) -> Iterator[None]:
    """Bind the side inputs of examples ``e0..e1-1`` (nothing for a model of one input)."""
    if not isinstance(call, WithSide):
        yield
        return
    with call.bound(call.rows(e0, e1)):
        yield


class Pointwise(keras.layers.Layer):
    """Apply a per-step layer to all steps at once (what TimeDistributed(Dense) means).

    Keras 3's TimeDistributed unrolls a Python loop over a static time axis and
    mis-shapes a dynamic one inside tf.function (see shared NOTES); Dense
    already maps the last axis of a (batch, T, H) tensor, with the same weights.
    A mask (from ``Masking`` or ``mask_zero``) passes through unchanged, as it
    does through TimeDistributed: the per-step layer never looks across steps.
    """

    def __init__(self, inner: keras.layers.Layer, **kwargs: Any) -> None:
        super().__init__(name=kwargs.pop("name", None) or f"pointwise_{inner.name}", **kwargs)
        self.inner = inner
        self.supports_masking = True

    def call(self, x: Any, mask: Any = None, training: Any = None) -> Any:
        return self.inner(x)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return self.inner.compute_output_shape(input_shape)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return mask


_POINTWISE = (keras.layers.Dense, keras.layers.Activation, keras.layers.Dropout,
              keras.layers.LayerNormalization)


def _uses_cudnn(layer: keras.layers.Layer) -> bool:
    """Whether the layer (or an RNN inside it, e.g. Bidirectional's) may pick cuDNN."""
    return any(getattr(sub, "use_cudnn", False) in (True, "auto")
               for sub in layer._flatten_layers(include_self=True, recursive=True))


def without_cudnn(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A copy of an RNN layer (or a wrapper of one) that never uses the cuDNN kernel.

    The cuDNN RNN kernel has no pfor converter and no second derivative, so
    ``pfor`` falls back to a slow loop and ``forward`` fails. The copy has the
    same weights and runs the generic kernel; ``use_cudnn`` is not part of a
    Keras 3 layer's config, so it is set on the copy's layers after building.
    """
    new = layer.__class__.from_config(layer.get_config())
    new.build(layer.input.shape)
    for sub in new._flatten_layers(include_self=True, recursive=True):
        if hasattr(sub, "use_cudnn"):
            sub.use_cudnn = False
    new.set_weights(layer.get_weights())
    return new


def _rewrite(layer: keras.layers.Layer, no_cudnn: bool) -> keras.layers.Layer:
    if isinstance(layer, keras.layers.TimeDistributed) and isinstance(layer.layer, _POINTWISE):
        if not isinstance(layer.layer, keras.layers.LayerNormalization) or \
                list(np.atleast_1d(layer.layer.axis)) in ([-1], [2]):
            return Pointwise(layer.layer)
    if no_cudnn and _uses_cudnn(layer):
        return without_cudnn(layer)
    return layer


@dataclass
class PreparedModel:
    call: Callable[[Any], Any]
    rewritten: list[str] = field(default_factory=list)
    output: np.ndarray | None = None  # call's output on the sample, where it was computed


def prepare_model(model: Any, sample: np.ndarray, device: str,
                  no_cudnn: bool | None = None) -> PreparedModel:
    """A call path for ``model`` that is faster to differentiate and gives identical outputs.

    Functional and Sequential Keras models are cloned with shared layers, with
    ``TimeDistributed(Dense)`` applied pointwise and, when ``no_cudnn`` (by
    default: on a GPU), RNN layers copied to run without the cuDNN kernel. The
    clone is used only if its output on ``sample`` equals the original's (to a
    few ulps, the rounding of one matmul for all steps instead of one per step;
    to float32 rounding where a cuDNN kernel was replaced, since cuDNN sums in
    another order); otherwise the original model is used. A model
    of several inputs (:class:`WithSide`) has its Keras model prepared so, on the
    sample's side inputs.
    """
    if isinstance(model, WithSide):
        with side_rows(model, 0, sample.shape[0]):
            inner = _prepared(model.model, device, no_cudnn, lambda m: model.with_model(m)(sample))
        call = model if inner.call is model.model else model.with_model(inner.call)
        return PreparedModel(call, inner.rewritten, inner.output)
    return _prepared(model, device, no_cudnn, lambda m: m(sample, training=False))


def _prepared(model: Any, device: str, no_cudnn: bool | None,
              run: Callable[[Any], Any]) -> PreparedModel:
    """:func:`prepare_model` of a Keras model, whose outputs on the sample ``run`` gives."""
    if not isinstance(model, keras.Model):
        return PreparedModel(model)
    if no_cudnn is None:
        no_cudnn = ":GPU:" in device
    changed: list[str] = []
    cudnn_replaced = []

    def clone_fn(layer: keras.layers.Layer) -> keras.layers.Layer:
        new = _rewrite(layer, no_cudnn)
        if new is not layer:
            changed.append(f"{layer.__class__.__name__}({layer.name})"
                           + (": no cuDNN" if not isinstance(new, Pointwise) else ""))
            cudnn_replaced.append(not isinstance(new, Pointwise))
        return new

    try:
        clone = keras.models.clone_model(model, clone_function=clone_fn)
    except Exception:  # subclassed or exotic: keep the model as it is
        return PreparedModel(model)
    if not changed:
        return PreparedModel(model)
    with tf.device(device):
        a = np.asarray(run(model))
        b = np.asarray(run(clone))
    if a.shape != b.shape:
        return PreparedModel(model, output=a)
    if not _same_outputs(a, b, cudnn=any(cudnn_replaced)):
        return PreparedModel(model, output=a)
    return PreparedModel(clone, changed, output=b)


def _same_outputs(a: np.ndarray, b: np.ndarray, cudnn: bool) -> bool:
    """Whether the clone's outputs ``b`` are the original's ``a`` up to summation order.

    A pointwise head is the same arithmetic in one matmul instead of one per step,
    which some kernels (oneDNN capped at AVX2) round differently in the last bit:
    a few ulps of the output's dtype are allowed. cuDNN sums in another order
    throughout the recurrence, so a replaced cuDNN kernel gets float32 rounding.
    """
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-30)
    if cudnn:
        return bool(np.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))
    eps = float(np.finfo(a.dtype).eps) if np.issubdtype(a.dtype, np.floating) else 0.0
    return bool(np.allclose(a, b, rtol=64 * eps, atol=64 * eps * scale))


def model_kind(model: Any, call: Callable[[Any], Any], f_in: int,
               dtype: tf.DType = tf.float32) -> tuple[str, int]:
    """``("recurrent" | "feedforward", number of parameters)`` for strategy prediction.

    Keras models are judged by their layers (any RNN is recurrent); other
    callables by the ops of their traced graph (a while loop is recurrent),
    their size by the tensors the graph captures.
    """
    if isinstance(model, WithSide):
        model = model.model
    if isinstance(model, keras.Model):
        rnn = any(isinstance(sub, RNN_LAYERS)
                  for sub in model._flatten_layers(include_self=False, recursive=True))
        return ("recurrent" if rnn else "feedforward"), int(model.count_params())
    try:
        conc = tf.function(call).get_concrete_function(tf.TensorSpec([None, None, f_in], dtype))
    except Exception:
        return "feedforward", 0
    ops = {op.type for op in conc.graph.get_operations()}
    for f in conc.graph._functions.values():  # bodies of while loops live in sub-functions
        ops.update(node.op for node in f.cached_definition.node_def)
    n = sum(int(v.shape.num_elements() or 0) for v in conc.graph.variables)
    n += sum(int(t.shape.num_elements() or 0) for t in conc.captured_inputs
             if t.dtype != tf.resource)
    return ("recurrent" if ops & {"While", "StatelessWhile"} else "feedforward"), n


def step_outputs(call: Callable[[Any], Any], x: Any) -> tf.Tensor:
    """The model's outputs as ``(batch, steps, features)``.

    A model that returns ``(batch, features)`` (a seq-to-one forecaster, e.g.
    ``LSTM(return_sequences=False) -> Dense``) has one output step: its outputs
    get a time axis of length 1, so every strategy and check sees three axes.
    """
    y = tf.convert_to_tensor(call_model(call, x))
    return y[:, None, :] if y.shape.rank == 2 else y
