"""The eager checks: what must hold of a model before its Jacobian is computed.

:func:`inspect_model` calls the model on a short prefix of two examples and
refuses outputs of the wrong rank, batch or dtype, models that mix examples
across the batch or are random, and models that are not differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from .. import events
from ..errors import ModelError, first_line
from ..planning import normalize_out_steps
from ..planning.units import is_float
from ._tf import tf
from .models import (
    PreparedModel,
    WithSide,
    call_model,
    forward,
    prepare_model,
    side_rows,
    step_outputs,
)

__all__ = ["SHORT_STEPS", "ModelInfo", "check_batch_independence", "check_differentiable",
           "inspect_model"]

# Prefix lengths tried for the eager structural checks, shortest first (an eager RNN
# step costs ~3 ms here, and the checks run ~12 forward-pass equivalents); a model
# that needs a longer input is checked on the next, and at worst on the full length.
SHORT_STEPS = (16, 64)


@dataclass
class ModelInfo:
    """What the eager checks learned about the model on the job's inputs."""

    prepared: PreparedModel  # the call path used from here on
    sample: np.ndarray       # the first (up to) 2 examples at full length
    short: np.ndarray        # a prefix of ``sample``: the eager checks ran on it
    y_short: np.ndarray      # the model's output on ``short``
    batch: int
    t_in: int
    f_in: int
    f_out: int
    # Why the model is a chain of Keras' own layers (None if it is not): such a model is
    # per example, deterministic, differentiable and causal by its layers' definitions.
    builtin_chain: str | None = None
    # Output steps at the full input length, where the eager pass showed it (None: the
    # traced function tells).
    t_out: int | None = None
    # The model returns (batch, features): one output step, a time axis of length 1 added.
    one_step: bool = False
    dtype: str = "float32"   # what the model computes in (the dtype of ``sample``)

    @property
    def call(self) -> Any:
        return self.prepared.call


def inspect_model(model: Any, x: Any, dev: str, out_steps: Any) -> ModelInfo:
    """Call the model eagerly on a prefix of two examples and run the structural checks.

    Raises ModelError for outputs of the wrong rank, batch or dtype, for a model
    that mixes examples or is random, or that is not differentiable. Outputs
    ``(batch, features)`` are taken as one output step (``ModelInfo.one_step``).
    """
    batch = int(x.shape[0])
    with events.phase("checks"), side_rows(model, 0, min(2, batch)):
        return _inspect(model, x, dev, out_steps)


def _inspect(model: Any, x: Any, dev: str, out_steps: Any) -> ModelInfo:
    """:func:`inspect_model`'s work, with the side inputs of the sample bound."""
    batch, t_in, f_in = (int(s) for s in x.shape)
    sample = np.ascontiguousarray(np.asarray(x[: min(2, batch)]))
    prepared, short, y_raw = _prepare(model, sample, dev)
    y_short = _as_steps(y_raw, short.shape)
    from .recurrence import builtin_chain

    trusted, why = builtin_chain(model)
    one_step = y_raw.ndim == 2
    call = partial(step_outputs, prepared.call) if one_step else prepared.call
    t_out = 1 if one_step else _output_length(call, sample, short, y_short, trusted, dev)
    if t_out is not None:   # known from the eager pass: fail before tracing
        normalize_out_steps(out_steps, t_out)
    if not trusted:   # Keras' own per-step and RNN layers hold these by definition
        check_batch_independence(call, short, dev, y_short)
        check_differentiable(call, short, dev)
    return ModelInfo(prepared, sample, short, y_short, batch, t_in, f_in, int(y_short.shape[2]),
                     why if trusted else None, t_out, one_step, str(sample.dtype))


def _as_steps(y: np.ndarray, x_shape: tuple[int, ...]) -> np.ndarray:
    """The eager outputs as ``(batch, steps, features)``; ModelError for any other shape."""
    if y.ndim not in (2, 3) or y.shape[0] != x_shape[0]:
        raise ModelError(
            f"the model must map inputs (batch, steps, features) to outputs (batch, steps, "
            f"features), or (batch, features) for one output step, with the same batch "
            f"size; for inputs of shape {x_shape} it returned shape {y.shape}. Keep the "
            "batch axis first with one output per input example, and reshape other outputs "
            "to (batch, steps, features) (e.g. keras.layers.Reshape((steps, features))).")
    if not is_float(y.dtype):
        raise ModelError(
            f"the model returned outputs of dtype {y.dtype}; only floating-point "
            "outputs can be differentiated. Return the float values before any cast, "
            "argmax or round.")
    return y[:, None, :] if y.ndim == 2 else y


def _output_length(call: Callable[[Any], Any], sample: np.ndarray, short: np.ndarray,
                   y_short: np.ndarray, trusted: bool, dev: str) -> int | None:
    """Output steps at the full input length, where the eager pass tells (None: trace).

    A prefix with as many output steps as input steps is a model whose output
    length follows its input length, unless its output length is fixed and
    happens to be the prefix's (a horizon of 16): one step more tells them apart.
    """
    n, t_in = short.shape[1], sample.shape[1]
    if n == t_in:
        return int(y_short.shape[1])
    if y_short.shape[1] != n:
        return None   # a fixed horizon or a strided model: the traced function tells
    if trusted:       # per-step and recurrent layers returning sequences keep the length
        return t_in
    try:
        longer = forward(call, sample[:1, : n + 1], dev)
    except Exception:
        return None
    return t_in if longer.ndim == 3 and longer.shape[1] == n + 1 else None


def _prepare(model: Any, sample: np.ndarray, dev: str) -> tuple[PreparedModel, np.ndarray,
                                                                np.ndarray]:
    """The prepared model, the prefix of ``sample`` it runs on, and its output there.

    The structural checks run eagerly on a short prefix (eager RNNs are slow); a
    model that fails on one (e.g. a valid convolution longer than it) is tried on
    a longer one, and at last on the full length, whose failure is reported.
    """
    lengths = [n for n in SHORT_STEPS if n < sample.shape[1]]
    for n in lengths:
        try:
            return _prepared_on(model, sample[:, :n], dev)
        except Exception:
            continue
    try:
        return _prepared_on(model, sample, dev)
    except Exception as e:
        shapes = (f"inputs of shape {sample.shape} ({sample.dtype})" if not
                  isinstance(model, WithSide) else f"its input {model.wrt!r} of shape "
                  f"{sample.shape} ({sample.dtype}) and the other inputs of the same examples")
        raise ModelError(
            f"calling the model on {shapes} failed with {type(e).__name__}: {first_line(e)}. "
            "Check that the inputs have the length and number of features the model was "
            "built for. A model of several inputs takes them all, e.g. jacobian(model, "
            "{'seq': x, 'static': s}, store, wrt='seq'): jacstream passes each block its "
            "examples of every input (a tensor of the whole batch captured in a closure "
            "does not match a block's examples).") from e


def _prepared_on(model: Any, short: np.ndarray,
                 dev: str) -> tuple[PreparedModel, np.ndarray, np.ndarray]:
    prepared = prepare_model(model, short, dev)
    y = prepared.output if prepared.output is not None else forward(prepared.call, short, dev)
    return prepared, short, np.asarray(y)


def _differs(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference between two outputs, NaN/Inf in the same places counting as equal."""
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if same.all():
        return 0.0
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))[~same]
    return float(np.max(np.where(np.isfinite(d), d, np.inf)))


def check_batch_independence(call: Callable[[Any], Any], x: np.ndarray, device: str,
                             y: np.ndarray | None = None) -> None:
    """Raise ModelError if changing one example changes the outputs of another.

    Both directions are tried on two examples (a copy of the only one when the
    batch has one: a tiled block repeats examples, so mixing matters even then).
    A model that is merely random (Dropout with training=True) is named as such.
    ``y``, the output on ``x`` when already computed, saves one forward pass.
    """
    x2 = np.concatenate([x[:1], x[1:2] if x.shape[0] > 1 else x[:1]]).copy()
    try:
        y_a = (y if y is not None and x.shape[0] == 2 and y.shape[:1] == (2,)
               else forward(call, x2, device))
    except Exception:
        if x.shape[0] > 1:
            raise
        return  # a model that only accepts batches of one cannot mix examples
    if y_a.ndim == 0 or y_a.shape[0] != 2:
        return  # the caller reports the shape
    rng = np.random.default_rng(0)
    scale = float(np.std(x2[np.isfinite(x2)])) if np.isfinite(x2).any() else 1.0
    for changed, watched in ((0, 1), (1, 0)):
        xb = x2.copy()
        xb[changed] += rng.standard_normal(xb[changed].shape).astype(xb.dtype) * (scale + 1.0)
        diff = _differs(y_a[watched], forward(call, xb, device)[watched])
        if diff == 0.0:
            continue
        again = _differs(y_a, forward(call, x2, device))
        if again:
            raise ModelError(
                "the model is not deterministic: two calls on the same inputs gave outputs that "
                f"differ by up to {again:.3g}, so its Jacobian is not well defined. Common "
                "causes: Dropout or GaussianNoise called with training=True, or random ops "
                "(tf.random.*) in the model. Call such layers with training=False.")
        raise ModelError(
            f"the model mixes examples across the batch: changing example {changed} changed "
            f"the outputs of example {watched} (by up to {diff:.3g}). A per-example Jacobian "
            "(batch_jacobian) of such a model is not what it seems. Common causes: "
            "BatchNormalization called with training=True, or an op that reduces over the batch "
            "axis. Call the layer with training=False, or wrap the model so each example is "
            "processed on its own.")


_MAX_GRADIENT_GROUPS = 16  # backward passes spent on the check below, at most


def check_differentiable(call: Callable[[Any], Any], x: np.ndarray, device: str) -> None:
    """Raise ModelError where the outputs change with the inputs but TF gives no gradient.

    TensorFlow returns ``None`` or exact zeros through an integer cast,
    ``tf.stop_gradient``, argmax, round or sign: the Jacobian would be silently
    zero. Output features whose gradient is zero on ``x`` are perturbed
    (slightly, and by the inputs' own scale when there is no gradient path at
    all or the feature varies); input features with a zero gradient slightly.
    A change where the gradient says none is possible means a non-differentiable
    path. A stop_gradient beside a differentiable path to the same output cannot
    be seen this way.
    """
    rng = np.random.default_rng(1)
    y0, no_path, flat_out, flat_in = _zero_gradients(call, x, device, rng)
    if not flat_out and not flat_in:
        return
    bad = _changing(call, x, device, rng, y0, no_path, flat_out, flat_in)
    if bad is None:
        return
    bad_out, bad_in = bad
    if no_path:
        where = "TensorFlow returned no gradient at all (None) for the outputs"
    elif bad_out:
        where = (f"output feature{'s' if len(bad_out) > 1 else ''} {bad_out[:10]} "
                 f"{'change' if len(bad_out) > 1 else 'changes'} with the inputs, but "
                 "TensorFlow's gradient of it is zero everywhere")
    else:
        where = (f"the outputs change with input feature{'s' if len(bad_in) > 1 else ''} "
                 f"{bad_in[:10]}, but TensorFlow's gradient with respect to "
                 f"{'them' if len(bad_in) > 1 else 'it'} is zero everywhere")
    raise ModelError(
        f"the model is not differentiable with respect to its inputs: {where}. Its Jacobian "
        "would come back as zeros (or None from tape.gradient) although the outputs do depend "
        "on the inputs. This is what an integer cast, tf.stop_gradient, argmax, round or sign "
        "in the path from inputs to outputs does. Make that path differentiable (keep float "
        "values, remove stop_gradient, use a softmax instead of argmax), or differentiate the "
        "part of the model before it.")


def _zero_gradients(call: Callable[[Any], Any], x: np.ndarray, device: str,
                    rng: np.random.Generator) -> tuple[np.ndarray, bool, list[int], list[int]]:
    """(outputs, no gradient path at all, output features and input features whose
    gradient is zero everywhere on ``x``)."""
    xt = tf.constant(x)
    with tf.device(device), tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        tape.watch(xt)
        y = tf.convert_to_tensor(call_model(call, xt))
        f_out = int(y.shape[-1])
        groups = np.array_split(np.arange(f_out), min(f_out, _MAX_GRADIENT_GROUPS))
        w = tf.constant(rng.uniform(0.5, 1.5, size=tuple(y.shape)).astype(y.dtype.as_numpy_dtype))
        yw = y * w
        sums = ([tf.reduce_sum(tf.gather(yw, g, axis=2)) for g in groups]
                if len(groups) > 1 else [])
        total = tf.reduce_sum(yw)
    with tf.device(device):
        g_total = tape.gradient(total, xt)
        grads = [tape.gradient(s, xt) for s in sums] if sums else [g_total]
    del tape
    no_path = g_total is None
    flat_out = [int(f) for g, gr in zip(groups, grads, strict=True)
                if gr is None or not np.any(np.asarray(gr)) for f in g]
    flat_in = (list(range(x.shape[2])) if no_path else
               [j for j in range(x.shape[2]) if not np.any(np.asarray(g_total)[..., j])])
    return np.asarray(y), no_path, flat_out, flat_in


def _changing(call: Callable[[Any], Any], x: np.ndarray, device: str, rng: np.random.Generator,
              y0: np.ndarray, no_path: bool, flat_out: list[int],
              flat_in: list[int]) -> tuple[list[int], list[int]] | None:
    """Of the features with a zero gradient, those whose outputs change when the inputs
    do (output features, input features); None when none does or the model is random."""
    finite = np.isfinite(x)
    s = float(np.std(x[finite])) if finite.any() else 1.0
    s = s if s > 0 else 1.0
    noise = rng.standard_normal(x.shape).astype(x.dtype)
    small = forward(call, x + 1e-2 * s * noise, device)
    big = forward(call, x + s * noise, device)
    if _differs(forward(call, x, device), y0):
        return None  # random outputs: check_batch_independence reports that
    finite_y = np.abs(y0[np.isfinite(y0)])
    tol = 1e-5 * (float(finite_y.max()) if finite_y.size else 1.0) + 1e-30
    bad_out = []
    for f in flat_out:
        varies = bool(np.ptp(y0[..., f])) if np.isfinite(y0[..., f]).all() else True
        if _differs(small[..., f], y0[..., f]) > tol or (
                (no_path or varies) and _differs(big[..., f], y0[..., f]) > tol):
            bad_out.append(f)
    bad_in: list[int] = []
    if flat_in and not bad_out:
        xi = x.copy()
        xi[..., flat_in] += 1e-2 * s * noise[..., flat_in]
        if _differs(forward(call, xi, device), y0) > tol:
            bad_in = flat_in
    return (bad_out, bad_in) if bad_out or bad_in else None
