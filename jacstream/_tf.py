"""Differentiation: the only module that imports TensorFlow.

It prepares the model (a faster, numerically identical call path), builds the
block function traced once with ``tf.function`` (dynamic shapes, so blocks of
any length and causal truncation reuse one trace), measures its memory cost
and fingerprints models.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ._memory import PeakTracker, release_free_memory  # noqa: E402
from ._pfor import fast_pfor_tracing  # noqa: E402
from ._plan import CostModel  # noqa: E402
from .errors import DeviceError, ModelError  # noqa: E402

__all__ = ["STRATEGIES", "BlockFunction", "StrategyUnavailable", "fingerprint_model",
           "prepare_model", "resolve_device", "without_cudnn"]

STRATEGIES = ("pfor", "tile", "forward")
# Forward mode's implementations, in the order validate() tries them.
FORWARD_IMPLS = ("accumulator", "transpose")


# --------------------------------------------------------------------------- devices
def resolve_device(device: str | None) -> str:
    """Turn ``None``, ``"cpu"``, ``"gpu"``, ``"GPU:1"``... into a TF device name that exists."""
    logical = [d.name for d in tf.config.list_logical_devices()]
    if device is None:
        gpus = [d for d in logical if ":GPU:" in d]
        return gpus[0] if gpus else next(d for d in logical if ":CPU:" in d)
    if not isinstance(device, str):
        raise DeviceError(f"device must be a string such as 'cpu' or 'gpu:0', got {device!r}.")
    want = device.strip().upper().lstrip("/")
    if "DEVICE:" in want:  # "/device:CPU:0", "/job:localhost/replica:0/task:0/device:CPU:0"
        want = want.rsplit("DEVICE:", 1)[1]
    if ":" not in want:
        want += ":0"
    for name in logical:
        if name.upper().endswith("DEVICE:" + want) or name.upper().endswith(want):
            return name
    raise DeviceError(f"device={device!r} does not exist here; TensorFlow sees "
                      f"{[n.split('device:')[-1] for n in logical]}. Use one of those, or None "
                      "(a GPU if there is one, else the CPU).")


# --------------------------------------------------------------------------- model prep
class _Pointwise(keras.layers.Layer):
    """Apply a per-step layer to all steps at once (what TimeDistributed(Dense) means).

    Keras 3's TimeDistributed unrolls a Python loop over a static time axis and
    mis-shapes a dynamic one inside tf.function (see shared NOTES); Dense
    already maps the last axis of a (batch, T, H) tensor, with the same weights.
    """

    def __init__(self, inner: keras.layers.Layer, **kwargs: Any) -> None:
        super().__init__(name=kwargs.pop("name", None) or f"pointwise_{inner.name}", **kwargs)
        self.inner = inner

    def call(self, x: Any, mask: Any = None, training: Any = None) -> Any:
        return self.inner(x)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return self.inner.compute_output_shape(input_shape)


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
            return _Pointwise(layer.layer)
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
    clone is used only if its output on ``sample`` equals the original's
    (exactly; to float32 rounding where a cuDNN kernel was replaced, since
    cuDNN sums in another order); otherwise the original model is used.
    """
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
                           + (": no cuDNN" if not isinstance(new, _Pointwise) else ""))
            cudnn_replaced.append(not isinstance(new, _Pointwise))
        return new

    try:
        clone = keras.models.clone_model(model, clone_function=clone_fn)
    except Exception:  # subclassed or exotic: keep the model as it is
        return PreparedModel(model)
    if not changed:
        return PreparedModel(model)
    with tf.device(device):
        a = np.asarray(model(sample, training=False))
        b = np.asarray(clone(sample, training=False))
    if a.shape != b.shape:
        return PreparedModel(model, output=a)
    if any(cudnn_replaced):
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        if not np.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)):
            return PreparedModel(model, output=a)
    elif not np.array_equal(a, b):
        return PreparedModel(model, output=a)
    return PreparedModel(clone, changed, output=b)


def model_kind(model: Any, call: Callable[[Any], Any], f_in: int,
               dtype: tf.DType = tf.float32) -> tuple[str, int]:
    """``("recurrent" | "feedforward", number of parameters)`` for strategy prediction.

    Keras models are judged by their layers (any RNN is recurrent); other
    callables by the ops of their traced graph (a while loop is recurrent),
    their size by the tensors the graph captures.
    """
    if isinstance(model, keras.Model):
        rnn = any(isinstance(sub, _CAUSAL_RNN)
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


def fingerprint_model(model: Any) -> str:
    """A hash of the model's class, configuration and weights (sha256 hex)."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    if isinstance(model, keras.layers.Layer):
        try:
            h.update(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
        except Exception:
            pass
        for w in model.weights:
            h.update(w.path.encode() if hasattr(w, "path") else w.name.encode())
            h.update(np.ascontiguousarray(w.numpy()).tobytes())
    else:
        # A plain callable: its code and the weights of any Keras/TF variables it closes over.
        code = getattr(model, "__code__", None)
        if code is not None:
            h.update(code.co_code)
            h.update(repr(code.co_consts).encode())
        for cell in getattr(model, "__closure__", None) or ():
            try:
                obj = cell.cell_contents
            except ValueError:
                continue
            if isinstance(obj, keras.layers.Layer):
                h.update(fingerprint_model(obj).encode())
            elif isinstance(obj, (tf.Variable, np.ndarray, tf.Tensor)):
                h.update(np.asarray(obj).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- block function
class StrategyUnavailable(ModelError):
    """A strategy cannot differentiate this model (e.g. forward mode through an op without
    a forward or second derivative); ``strategy="auto"`` then leaves it out."""


class _DevicePeak:
    """Peak memory of a GPU inside a ``with`` block, above its start (TF's allocator stats)."""

    def __init__(self, device: str) -> None:
        self.device = device.split("device:")[-1]
        self.start = self.peak = 0

    @property
    def increase(self) -> int:
        return max(0, self.peak - self.start)

    def __enter__(self) -> _DevicePeak:
        tf.config.experimental.reset_memory_stats(self.device)
        self.start = int(tf.config.experimental.get_memory_info(self.device)["current"])
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = int(tf.config.experimental.get_memory_info(self.device)["peak"])


def peak_tracker(device: str) -> Any:
    """Memory tracker for a probe: device memory on a GPU, resident memory on the CPU."""
    return _DevicePeak(device) if ":GPU:" in device else PeakTracker()


class BlockFunction:
    """The Jacobian of one block, traced once, by one strategy.

    Reverse mode (``"pfor"``, ``"tile"``): ``fn(x, idx, in_len)`` with ``x`` of
    shape ``(examples, T_in, F_in)`` and ``idx`` the block's output steps returns
    ``d y[:, idx, :] / d x[:, :in_len]`` of shape ``(examples, len(idx), F_out,
    in_len, F_in)``, the output shape the model gave and the input length it was
    fed. Forward mode (``"forward"``): ``fn(x, idx, in_len, (t0, t1))`` returns
    the columns ``d y[:, idx, :] / d x[:, t0:t1]``, shape ``(examples, len(idx),
    F_out, t1 - t0, F_in)``, feeding the model ``x[:, :in_len]``.

    * ``pfor``: ``batch_jacobian`` of the block (vectorised reverse mode).
    * ``tile``: ``len(idx) * F_out`` copies of each example and one ordinary
      gradient of ``sum(y * one_hot)``; copy r yields row r. Needs examples
      that do not interact (checked before).
    * ``forward``: ``(t1 - t0) * F_in`` copies of each example, each carrying a
      one-hot tangent, and one Jacobian-vector product for all of them. It is
      done with ``tf.autodiff.ForwardAccumulator`` where that can trace the
      model ("accumulator"), else as the transpose of a vector-Jacobian product
      (``d/du <J^T u, v>``: two reverse passes, "transpose"), which also works
      through Keras RNN loops where the accumulator fails (TensorList ops have
      no forward rule). :meth:`validate` picks the implementation.

    Normally the input length and the number of steps are dynamic in the traced
    signature, so one trace serves every block, the shorter last block and
    causal truncation. Models that misbehave on a dynamic time axis are detected
    by :meth:`validate` and run with static shapes instead: full-length inputs
    and blocks padded to one length, so still one or two traces.
    """

    def __init__(self, call: Callable[[Any], Any], strategy: str, f_in: int, f_out: int,
                 device: str, dtype: tf.DType = tf.float32) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.call = call
        self.strategy = strategy
        self.device = device
        self.dtype = dtype
        self.f_in = int(f_in)
        self.f_out = int(f_out)
        self.impl = FORWARD_IMPLS[0] if strategy == "forward" else strategy
        self.notes: list[str] = []  # why implementations were passed over, by validate()
        self.t_out = 0              # output steps at full length, set by validate()
        self.traces = 0
        self.static = False
        self.static_block = 1       # static mode: block length to pad to (plan.block_size)
        self.static_idx = 0         # static forward mode: output positions to pad to
        self._build()

    @property
    def forward_mode(self) -> bool:
        return self.strategy == "forward"

    def _build(self) -> None:
        body = {"pfor": self._pfor, "tile": self._tile, "accumulator": self._fwd_accumulator,
                "transpose": self._fwd_transpose}[self.impl]
        sig = [tf.TensorSpec([None, None, self.f_in], self.dtype),
               tf.TensorSpec([None], tf.int32)]
        if self.forward_mode:
            sig += [tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)]
        self._dynamic_fn = tf.function(body, input_signature=sig)
        self._static_fn = tf.function(body, reduce_retracing=False)

    def _forward(self, x: tf.Tensor, idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        y = self.call(x, training=False) if isinstance(self.call, keras.Model) else self.call(x)
        y = tf.convert_to_tensor(y)
        # Taken inside the tape: a slice taken outside gives None gradients.
        return tf.gather(y, idx, axis=1), tf.shape(y)

    # -- reverse mode -----------------------------------------------------
    def _pfor(self, x: tf.Tensor, idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        self.traces += 1
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            yb, yshape = self._forward(x, idx)
        # Outputs that truly do not move give zeros; models that are not differentiable
        # were refused before tracing (check_differentiable).
        with fast_pfor_tracing():
            jac = tape.batch_jacobian(yb, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if jac is None:
            raise ModelError(_NO_GRADIENT)
        return jac, yshape

    def _tile(self, x: tf.Tensor, idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # K*F_out copies of each example, one ordinary gradient of sum(y * one_hot):
        # copy r of example i yields row r of example i's Jacobian. Exact only
        # for models whose examples do not interact (checked before running).
        self.traces += 1
        b, length, f_in = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
        k = tf.shape(idx)[0]
        r = k * self.f_out
        xt = tf.repeat(x, r, axis=0)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(xt)
            yb, yshape = self._forward(xt, idx)          # (b*r, k, F_out)
            yb = tf.reshape(yb, [b, r, r])
            loss = tf.reduce_sum(yb * tf.eye(r, dtype=yb.dtype)[None])
        g = tape.gradient(loss, xt, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if g is None:
            raise ModelError(_NO_GRADIENT)
        yshape = tf.tensor_scatter_nd_update(yshape, [[0]], [b])
        return tf.reshape(g, [b, k, self.f_out, length, f_in]), yshape

    # -- forward mode -----------------------------------------------------
    def _tangents(self, x: tf.Tensor, t0: tf.Tensor,
                  t1: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(t1-t0)*F_in`` copies of each example and their one-hot tangents."""
        b, length = tf.shape(x)[0], tf.shape(x)[1]
        n = t1 - t0
        r = n * self.f_in
        xt = tf.repeat(x, r, axis=0)
        one_hot = tf.reshape(tf.eye(r, dtype=x.dtype), [r, n, self.f_in])
        tangent = tf.tile(tf.pad(one_hot, [[0, 0], [t0, length - t1], [0, 0]]), [b, 1, 1])
        return xt, tangent, b, n

    def _columns(self, jvp: tf.Tensor | None, yshape: tf.Tensor, b: tf.Tensor, n: tf.Tensor,
                 idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if jvp is None:
            raise ModelError(_NO_GRADIENT)
        k = tf.shape(idx)[0]
        jac = tf.transpose(tf.reshape(jvp, [b, n, self.f_in, k, self.f_out]), [0, 3, 4, 1, 2])
        return jac, tf.tensor_scatter_nd_update(yshape, [[0]], [b])

    def _fwd_accumulator(self, x: tf.Tensor, idx: tf.Tensor, t0: tf.Tensor,
                         t1: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        self.traces += 1
        xt, tangent, b, n = self._tangents(x, t0, t1)
        with tf.autodiff.ForwardAccumulator(xt, tangent) as acc:
            yb, yshape = self._forward(xt, idx)
        return self._columns(acc.jvp(yb, unconnected_gradients=tf.UnconnectedGradients.ZERO), yshape, b, n, idx)

    def _fwd_transpose(self, x: tf.Tensor, idx: tf.Tensor, t0: tf.Tensor,
                       t1: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # J v = d/du <J^T u, v>: J^T u is linear in u, so its derivative along v
        # does not depend on u (zeros here) and is exact.
        self.traces += 1
        xt, tangent, b, n = self._tangents(x, t0, t1)
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(xt)
                yb, yshape = self._forward(xt, idx)
            u = tf.zeros_like(yb)
            outer.watch(u)
            vjp = inner.gradient(yb, xt, output_gradients=u, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if vjp is None:
            raise ModelError(_NO_GRADIENT)
        jvp = outer.gradient(vjp, u, output_gradients=tangent, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self._columns(jvp, yshape, b, n, idx)

    # -- calling ----------------------------------------------------------
    def __call__(self, x: np.ndarray, idx: np.ndarray, in_len: int | None = None,
                 in_steps: tuple[int, int] | None = None,
                 ) -> tuple[np.ndarray, tuple[int, ...], int]:
        k = len(idx)
        full = x.shape[1]
        in_len = full if in_len is None else in_len
        idx = np.asarray(idx, dtype=np.int32)
        extra: tuple[int, ...] = ()
        skip = 0  # leading columns computed only to keep a static shape
        if self.forward_mode:
            if in_steps is None:
                raise ValueError("strategy 'forward' computes blocks of input steps: pass "
                                 "in_steps=(t0, t1) (Block.in_steps of a forward-mode plan).")
            t0, t1 = (int(s) for s in in_steps)
            if self.static:
                c0 = min(t0, max(0, t1 - self.static_block))
                skip, t0 = t0 - c0, c0
            extra = (t0, t1)
        if self.static:
            fed = full
            pad_to = self.static_idx if self.forward_mode else self.static_block
            if k < pad_to:
                idx = np.concatenate([idx, np.repeat(idx[-1:], pad_to - k)])
            fn = self._static_fn
        else:
            fed = in_len
            x = x[:, :in_len]
            fn = self._dynamic_fn
        with tf.device(self.device):
            # Offsets go in as tensors: Python ints would retrace the static function.
            jac, yshape = fn(tf.convert_to_tensor(np.ascontiguousarray(x)),
                             tf.convert_to_tensor(idx),
                             *(tf.constant(v, tf.int32) for v in extra))
        out = jac.numpy()
        if self.static:
            out = out[:, :k, :, skip:] if self.forward_mode else out[:, :k, :, :in_len]
        return out, tuple(int(s) for s in yshape.numpy()), fed

    def _tiny(self, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...], int]:
        """One row (reverse) or one column (forward) of the Jacobian: traces the function."""
        if self.forward_mode:
            return self(x, np.array([0]), x.shape[1], (0, 1))
        return self(x, np.array([0]))

    def validate(self, sample: np.ndarray, short: np.ndarray,
                 short_shape: tuple[int, ...]) -> int:
        """Trace the function, check it against an eager forward pass; return T_out.

        The dynamic signature must give, on the short sample, the output shape the
        eager model gave; otherwise (e.g. Keras TimeDistributed on a dynamic time
        axis) the function switches to static shapes. Forward mode tries the
        ForwardAccumulator first, then the transpose of reverse mode; what failed
        is kept in :attr:`notes`. Raises :class:`StrategyUnavailable` when forward
        mode cannot differentiate the model at all.
        """
        impls = FORWARD_IMPLS if self.forward_mode else (self.impl,)
        failures: list[str] = []
        last: Exception | None = None
        for static in (False, True):
            for impl in impls:
                self.impl, self.static, self.traces = impl, static, 0
                self._build()
                try:
                    if not static:
                        _, ys, _ = self._tiny(short)
                        if ys != tuple(short_shape):
                            raise ValueError(f"traced output shape {ys} != eager "
                                             f"{tuple(short_shape)}")
                    _, yfull, _ = self._tiny(sample)
                    if self.forward_mode:
                        self._check_forward(sample if static else short)
                except ModelError as e:
                    if not self.forward_mode:
                        raise
                    last = e  # e.g. no forward derivative: reverse mode may still work
                    failures.append(f"{impl}: {_first_line(e)}")
                    continue
                except Exception as e:
                    last = e
                    failures.append(f"{impl}{' (static shapes)' if static else ''}: "
                                    f"{type(e).__name__}: {_first_line(e)}")
                    continue
                if len(yfull) != 3 or yfull[0] != sample.shape[0] or yfull[2] != self.f_out:
                    raise ModelError(f"the model returned outputs of shape {yfull} for inputs "
                                     f"of shape {sample.shape}; expected (batch, steps, "
                                     f"{self.f_out}).")
                self.notes = failures
                self.t_out = int(yfull[1])
                return self.t_out
        if not self.forward_mode and last is not None:
            raise last
        raise StrategyUnavailable(
            f"strategy={self.strategy!r} cannot differentiate this model: "
            + "; ".join(failures) + ". Use strategy='pfor' or 'tile' (or 'auto').") from last

    def _check_forward(self, x: np.ndarray) -> None:
        """Raise ModelError unless forward mode agrees with a reverse-mode gradient.

        A weighted sum of the first input step's columns must equal the gradient
        of the same weighted sum of the outputs (one ordinary backward pass):
        forward mode through an op with a custom or incomplete derivative could
        otherwise give zeros or wrong values without an error.
        """
        length = x.shape[1]
        cols, _, _ = self(x, np.arange(length), length, (0, 1))   # (b, T, F_out, 1, F_in)
        w = np.random.default_rng(3).uniform(0.5, 1.5, size=cols.shape[1:3]).astype(x.dtype)
        fwd = np.einsum("btfj,tf->bj", cols[:, :, :, 0, :], w)
        xt = tf.constant(x)
        with tf.device(self.device), tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(xt)
            y = self.call(xt, training=False) if isinstance(self.call, keras.Model) \
                else self.call(xt)
            total = tf.reduce_sum(tf.convert_to_tensor(y) * w)
        g = tape.gradient(total, xt)
        rev = np.zeros_like(fwd) if g is None else np.asarray(g)[:, 0, :]
        scale = max(float(np.max(np.abs(rev))), float(np.max(np.abs(fwd))), 1e-30)
        if not np.allclose(fwd, rev, rtol=1e-4, atol=1e-5 * scale):
            raise ModelError(
                f"forward mode ({self.impl}) disagrees with reverse mode on this model (by up "
                f"to {float(np.max(np.abs(fwd - rev))):.3g}, scale {scale:.3g}): an op with a "
                "custom or incomplete derivative")

    def probe_cost(self, x: np.ndarray, max_len: int = 512) -> CostModel:
        """Measure the memory cost model with two small blocks (no extra trace).

        Probes on a prefix of ``max_len`` steps; a model that only accepts its
        full length is probed at full length with smaller blocks. On a GPU the
        device's own allocator statistics are measured
        (``tf.config.experimental.get_memory_info``), so the budget bounds
        device memory; on the CPU, resident memory.
        """
        if self.static:
            return CostModel()
        try:
            return self._probe(x, min(x.shape[1], max_len), 64)
        except ModelError:
            raise
        except Exception:
            return self._probe(x, x.shape[1], 2)

    def _probe_block(self, xs: np.ndarray, k: int) -> None:
        length = xs.shape[1]
        if self.forward_mode:
            self(xs, np.arange(length, dtype=np.int32), length, (0, min(k, length)))
        else:
            self(xs, np.arange(min(k, length), dtype=np.int32))

    def _probe(self, x: np.ndarray, length: int, k_max: int) -> CostModel:
        xs = np.ascontiguousarray(x[:, :length])
        k2 = max(2, min(k_max, length))
        # No warm-up call: validate() already ran the function at full length.
        # Each probe starts from a trimmed heap, and the larger one is measured twice
        # (the larger of the two counts): the difference between them, tens of MB, is
        # what the blocks scale by, and a reused free block would hide part of it.
        peaks = []
        for k in (1, k2, k2):
            release_free_memory()
            with peak_tracker(self.device) as t:
                self._probe_block(xs, k)
            peaks.append(t.increase)
        peaks = [peaks[0], max(peaks[1:])]
        b = x.shape[0]
        # rows of the Jacobian per block step: output features (reverse), input features
        # (forward: tangents)
        unit = self.f_in if self.forward_mode else self.f_out
        per_row = max(0.0, (peaks[1] - peaks[0]) / ((k2 - 1) * unit * b * length))
        per_step = max(0.0, (peaks[0] - per_row * unit * b * length) / (b * length))
        # Safety factors for allocator slack and temporaries that small probes miss.
        # Measured (reference LSTM, batch 10, 1 GiB budget, probes on trimmed heaps):
        # this model without the factors was 4% (T=3000) and 7% (T=1000) under the real
        # block working set; with untrimmed probes it had been 37% under at T=3000.
        return CostModel(fixed=32 * 2**20, per_step=1.15 * per_step + 256,
                         per_row_step=1.15 * per_row + 64, measured=True)


def _first_line(e: BaseException) -> str:
    """The line of a (TF / Keras wrapped) error message that says what went wrong."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    keep = []
    for line in (ln.strip() for ln in text.splitlines()):
        if not line or line.startswith(("in user code", "File ", "\u2022", "Arguments received")):
            continue
        keep.append(line)
    # Keras wraps the cause: "XError: Exception encountered when calling L.call()." + cause
    for i, line in enumerate(keep):
        if "Exception encountered when calling" in line and i + 1 < len(keep):
            return f"{keep[i + 1]} (in {line.split('calling ')[-1].rstrip('.')})"[:300]
    return (keep[-1] if keep else type(e).__name__)[:300]


_NO_GRADIENT = (
    "the model's outputs do not depend differentiably on its inputs: TensorFlow returned no "
    "gradient (None). This is what happens with an integer cast, tf.stop_gradient, argmax or "
    "round in the path from inputs to outputs, or when a slice of the output is taken outside "
    "the GradientTape. Remove the non-differentiable op, or differentiate a model whose "
    "outputs are a smooth function of its inputs.")


# --------------------------------------------------------------------------- model checks
def forward(call: Callable[[Any], Any], x: np.ndarray, device: str) -> np.ndarray:
    with tf.device(device):
        y = call(x, training=False) if isinstance(call, keras.Model) else call(tf.constant(x))
    return np.asarray(y)


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
    xt = tf.constant(x)
    with tf.device(device), tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        tape.watch(xt)
        y = tf.convert_to_tensor(call(xt, training=False) if isinstance(call, keras.Model)
                                 else call(xt))
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
    y0 = np.asarray(y)
    no_path = g_total is None
    flat_out = [int(f) for g, gr in zip(groups, grads, strict=True)
                if gr is None or not np.any(np.asarray(gr)) for f in g]
    flat_in = (list(range(x.shape[2])) if no_path else
               [j for j in range(x.shape[2]) if not np.any(np.asarray(g_total)[..., j])])
    if not flat_out and not flat_in:
        return
    finite = np.isfinite(x)
    s = float(np.std(x[finite])) if finite.any() else 1.0
    s = s if s > 0 else 1.0
    noise = rng.standard_normal(x.shape).astype(x.dtype)
    small = forward(call, x + 1e-2 * s * noise, device)
    big = forward(call, x + s * noise, device)
    if _differs(forward(call, x, device), y0):
        return  # random outputs: check_batch_independence reports that
    finite_y = np.abs(y0[np.isfinite(y0)])
    tol = 1e-5 * (float(finite_y.max()) if finite_y.size else 1.0) + 1e-30
    bad_out = []
    for f in flat_out:
        varies = bool(np.ptp(y0[..., f])) if np.isfinite(y0[..., f]).all() else True
        if _differs(small[..., f], y0[..., f]) > tol or (
                (no_path or varies) and _differs(big[..., f], y0[..., f]) > tol):
            bad_out.append(f)
    bad_in = []
    if flat_in and not bad_out:
        xi = x.copy()
        xi[..., flat_in] += 1e-2 * s * noise[..., flat_in]
        if _differs(forward(call, xi, device), y0) > tol:
            bad_in = flat_in
    if not bad_out and not bad_in:
        return
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


# Layers whose output at step t depends on inputs at steps <= t only.
_CAUSAL_RNN = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN, keras.layers.RNN)
_STEPWISE = (keras.layers.Dense, keras.layers.Activation, keras.layers.Dropout,
             keras.layers.InputLayer, keras.layers.LayerNormalization, keras.layers.ReLU,
             keras.layers.LeakyReLU, keras.layers.PReLU, keras.layers.ELU, keras.layers.Softmax,
             keras.layers.Add, keras.layers.Multiply, keras.layers.Subtract,
             keras.layers.Average, keras.layers.Maximum, keras.layers.Minimum,
             keras.layers.GaussianNoise, keras.layers.GaussianDropout,
             keras.layers.SpatialDropout1D, keras.layers.Rescaling, _Pointwise)


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
        y = call(xt, training=False) if isinstance(call, keras.Model) else call(xt)
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
