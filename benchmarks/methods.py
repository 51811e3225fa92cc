"""Methods: the ways of computing a per-example Jacobian that the benchmark compares.

Each method is a function run inside a case process (see :mod:`benchmarks.case`)
on a :class:`Context` (the workload, its inputs, the model). The case process
times the call; the function returns an :class:`Output` that can afterwards,
off the clock, hand out the Jacobian rows of the sampled (example, step)
pairs for the correctness check, report bytes on disk, and clean up.

Frameworks are imported inside the functions only: the TensorFlow methods run
in the TensorFlow interpreter, the PyTorch ones in an interpreter that has
torch, the JAX ones in an interpreter that has jax (neither need have
TensorFlow).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .workloads import Workload

__all__ = ["METHODS", "PEER_FRAMEWORKS", "Context", "Method", "Output", "Unavailable", "jax_model",
           "method_names"]

Pairs = list[tuple[int, int]]


class Unavailable(RuntimeError):
    """The method cannot run here (a missing package or feature); recorded, not an error."""


@dataclass
class Context:
    """What a method gets: the workload, its inputs and its model, and a scratch folder."""

    workload: Workload
    x: np.ndarray
    workdir: Path
    # keras.Model (TensorFlow methods), torch module (PyTorch), or a JAX function of one
    # example (T, F_in) -> (T, F_out): lax.scan (jax), the Keras model's (keras-jax).
    model: Any = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Output:
    """A method's result, read after the clock stops.

    ``sample(pairs)`` returns ``J[i, t1]`` for each pair, shape
    ``(len(pairs), F_out, T, F_in)``, or ``None`` when the method keeps no
    result (the null sink).
    """

    sample: Callable[[Pairs], np.ndarray | None]
    bytes_on_disk: Callable[[], int | None] = lambda: None
    meta: Callable[[], dict[str, Any]] = dict
    cleanup: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Method:
    name: str
    framework: str            # "jacstream", "tf", "torch", "jax" or "keras-jax"
    fn: Callable[[Context], Output]
    summary: str
    keeps_result: bool = True
    archs: tuple[str, ...] = ("lstm", "gru", "conv")
    # Run before the clock starts; may add to ``ctx.options``; returns the teardown.
    setup: Callable[[Context], Callable[[], None]] | None = None


def _rows(J: Any) -> Callable[[Pairs], np.ndarray]:
    return lambda pairs: np.stack([np.asarray(J[i, t]) for i, t in pairs])


def du(path: Path) -> int:
    """Bytes of all files under ``path``."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------- jacstream
def _jacstream(write: bool = True, **kwargs: Any) -> Callable[[Context], Output]:
    def run(ctx: Context) -> Output:
        import jacstream

        path = ctx.workdir / "jacobian.zarr"
        extra = dict(kwargs)
        budget = ctx.options.get("memory_budget")
        if "client" in ctx.options:
            extra["client"] = ctx.options["client"]
        if write:
            J = jacstream.jacobian(ctx.model, ctx.x, path, progress=False,
                                   memory_budget=budget, **extra)
        else:
            J = _null_sink_run(ctx.model, ctx.x, path, budget, extra)

        def meta() -> dict[str, Any]:
            p = J.plan
            return {"block_size": p.block_size, "examples_per_block": p.examples_per_block,
                    "n_blocks": p.n_blocks, "causal": p.causal, "strategy": p.strategy,
                    "memory_budget": p.memory_budget, "estimated_peak": p.estimated_peak,
                    "stats": {k: v for k, v in J.stats.items() if k != "computed_blocks"}}

        return Output(sample=_rows(J) if write else (lambda pairs: None),
                      bytes_on_disk=lambda: du(path), meta=meta,
                      cleanup=lambda: shutil.rmtree(path, ignore_errors=True))

    return run


def _null_sink_run(model: Any, x: Any, path: Path, budget: Any, extra: dict[str, Any]) -> Any:
    """jacstream's own job with a null sink: blocks computed, checked and dropped."""
    try:
        from jacstream.planning import parse_memory
        from jacstream.run.job import Request, run
        from jacstream.store import NullSink
    except ImportError:
        raise Unavailable("this jacstream has no null sink (jacstream.store.NullSink)") from None
    req = Request(store=path, progress=False, memory_budget=parse_memory(budget), **extra)
    return run(model, x, req, blocks_to=NullSink(path))


def _local_cluster(n_workers: int) -> Callable[[Context], Callable[[], None]]:
    """Start a ``LocalCluster`` of ``n_workers`` processes (one task each) before the clock.

    The workers are children of the case process, so their memory counts in the
    case's peak RSS; starting them is not timed, loading the model on them is.
    """

    def setup(ctx: Context) -> Callable[[], None]:
        from dask.distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, local_directory=str(ctx.workdir))
        client = Client(cluster)
        ctx.options = {**ctx.options, "client": client}

        def teardown() -> None:
            client.close()
            cluster.close()

        return teardown

    return setup


# --------------------------------------------------------------------------- TensorFlow
def _tf_tape(ctx: Context, traced: bool = False, **kwargs: Any) -> Output:
    import tensorflow as tf

    model = ctx.model
    # Eager batch_jacobian without pfor, or in chunks of rows, replays the tape: it must persist.
    persistent = not traced and (kwargs.get("experimental_use_pfor") is False
                                 or "parallel_iterations" in kwargs)

    def jac(x: Any) -> Any:
        with tf.GradientTape(persistent=persistent) as tape:
            tape.watch(x)
            y = model(x, training=False)
        return tape.batch_jacobian(y, x, **kwargs)

    fn = tf.function(jac) if traced else jac
    J = fn(tf.constant(ctx.x)).numpy()
    return Output(sample=_rows(J), meta=lambda: {"result_in_ram": int(J.nbytes)})


def _tf(traced: bool = False, **kwargs: Any) -> Callable[[Context], Output]:
    return lambda ctx: _tf_tape(ctx, traced, **kwargs)


# --------------------------------------------------------------------------- PyTorch
def torch_model(workload: Workload, weights: dict[str, np.ndarray]) -> Any:
    """``nn.LSTM + nn.Linear`` with the Keras model's weights (LSTM workloads only).

    Keras and PyTorch both order the LSTM gates i, f, c(g), o. Keras keeps
    kernels as ``(in, 4H)`` and one bias; PyTorch as ``(4H, in)`` with two
    biases: the Keras bias goes into ``bias_ih``, ``bias_hh`` is zero.
    """
    import torch

    if workload.arch != "lstm":
        raise Unavailable(f"no PyTorch equivalent is built for arch {workload.arch!r}")
    kernel, recurrent, bias, dense_k, dense_b = (weights[f"w{i}"] for i in range(5))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(workload.F_in, workload.H, batch_first=True)
            self.head = torch.nn.Linear(workload.H, workload.F_out)

        def forward(self, x: Any) -> Any:
            return self.head(self.lstm(x)[0])

    net = Net()
    t = torch.from_numpy
    with torch.no_grad():
        net.lstm.weight_ih_l0.copy_(t(np.ascontiguousarray(kernel.T)))
        net.lstm.weight_hh_l0.copy_(t(np.ascontiguousarray(recurrent.T)))
        net.lstm.bias_ih_l0.copy_(t(bias))
        net.lstm.bias_hh_l0.zero_()
        net.head.weight.copy_(t(np.ascontiguousarray(dense_k.T)))
        net.head.bias.copy_(t(dense_b))
    return net.eval()


def _single(net: Any) -> Callable[[Any], Any]:
    return lambda xi: net(xi.unsqueeze(0)).squeeze(0)      # (T, F_in) -> (T, F_out)


def _torch_vmap_jacrev(chunk_size: int | None) -> Callable[[Context], Output]:
    def run(ctx: Context) -> Output:
        import torch

        f = _single(ctx.model)
        J = torch.func.vmap(torch.func.jacrev(f, chunk_size=chunk_size))(
            torch.from_numpy(ctx.x)).detach().numpy()
        return Output(sample=_rows(J), meta=lambda: {"result_in_ram": int(J.nbytes)})

    return run


def _torch_jacobian_vectorize(ctx: Context) -> Output:
    import torch

    f = _single(ctx.model)
    x = torch.from_numpy(ctx.x)
    b, t, fi = ctx.x.shape
    J = np.empty((b, t, ctx.workload.F_out, t, fi), np.float32)
    for i in range(b):
        J[i] = torch.autograd.functional.jacobian(f, x[i], vectorize=True).detach().numpy()
    return Output(sample=_rows(J), meta=lambda: {"result_in_ram": int(J.nbytes)})


# --------------------------------------------------------------------------- JAX
def jax_model(workload: Workload, weights: dict[str, np.ndarray]) -> Callable[[Any], Any]:
    """The Keras model as a JAX function of one example, ``(T, F_in) -> (T, F_out)``.

    A ``lax.scan`` over the steps with the Keras weights (LSTM and GRU
    workloads), then the ``TimeDistributed(Dense)`` head. Keras orders the LSTM
    gates i, f, c, o in its ``(in, 4H)`` kernels and one ``(4H,)`` bias. Its GRU
    (``reset_after=True``, the default) orders the gates z, r, h in ``(in, 3H)``
    kernels and has a ``(2, 3H)`` bias: row 0 for the input projection, row 1
    for the recurrent one, whose h part the reset gate scales *after* the
    matmul; the new state is ``z * h + (1 - z) * hh``.
    """
    import jax
    import jax.numpy as jnp

    if workload.arch not in ("lstm", "gru"):
        raise Unavailable(f"no JAX equivalent is built for arch {workload.arch!r}")
    kernel, recurrent, bias, dense_k, dense_b = (jnp.asarray(weights[f"w{i}"])
                                                 for i in range(5))
    H = workload.H
    sigmoid = jax.nn.sigmoid

    # The input projection stays inside the step (as in the Keras cell): projected before the
    # scan, jacrev's backward scan would write a (4H)-wide cotangent per step and output row
    # instead of an F_in-wide one - measured 5.3 GiB instead of 0.6 GiB at T=1000.
    def lstm_step(carry: Any, xt: Any) -> tuple[Any, Any]:
        h, c = carry
        z = xt @ kernel + bias + h @ recurrent
        i, f, g, o = sigmoid(z[:H]), sigmoid(z[H:2 * H]), jnp.tanh(z[2 * H:3 * H]), \
            sigmoid(z[3 * H:])
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), h

    def gru_step(h: Any, xt: Any) -> tuple[Any, Any]:
        xw = xt @ kernel + bias[0]
        inner = h @ recurrent + bias[1]
        z = sigmoid(xw[:H] + inner[:H])
        r = sigmoid(xw[H:2 * H] + inner[H:2 * H])
        hh = jnp.tanh(xw[2 * H:] + r * inner[2 * H:])
        h = z * h + (1 - z) * hh
        return h, h

    zeros = jnp.zeros((H,), jnp.float32)

    def f(xi: Any) -> Any:
        if workload.arch == "lstm":
            _, hs = jax.lax.scan(lstm_step, (zeros, zeros), xi)
        else:
            _, hs = jax.lax.scan(gru_step, zeros, xi)
        return hs @ dense_k + dense_b

    return f


def _jax_vmap(transform: str) -> Callable[[Context], Output]:
    """``jax.jit(jax.vmap(jax.<transform>(f)))(x)``; the clock includes the compilation.

    ``f`` is ``ctx.model``: :func:`jax_model`'s, or :func:`keras_jax_function`'s.
    """

    def run(ctx: Context) -> Output:
        import jax

        J = np.asarray(jax.jit(jax.vmap(getattr(jax, transform)(ctx.model)))(ctx.x))
        return Output(sample=_rows(J), meta=lambda: {"result_in_ram": int(J.nbytes)})

    return run


def keras_jax_function(model: Any) -> Callable[[Any], Any]:
    """A Keras model on the JAX backend as a pure function of one example (``stateless_call``)."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def f(xi: Any) -> Any:
        y, _ = model.stateless_call(trainable, non_trainable, xi[None], training=False)
        return y[0]

    return f



# --------------------------------------------------------------------------- registry
_LSTM = ("lstm",)
_RNN = ("lstm", "gru")
# Frameworks whose cases run in another interpreter (``--torch-python``, ``--jax-python``):
# where it is missing their cases are recorded as unavailable, which is not a failure.
PEER_FRAMEWORKS = ("torch", "jax", "keras-jax")
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("jacstream", "jacstream", _jacstream(),
           "jacstream.jacobian, default options (causal='auto', strategy='auto'), to a zarr "
           "store"),
    Method("jacstream-pfor", "jacstream", _jacstream(strategy="pfor"),
           "jacstream, strategy='pfor'"),
    Method("jacstream-tile", "jacstream", _jacstream(strategy="tile"),
           "jacstream, strategy='tile'"),
    Method("jacstream-noncausal", "jacstream", _jacstream(causal=False),
           "jacstream, causal=False (computes and stores the zero upper triangle)"),
    Method("jacstream-nullsink", "jacstream", _jacstream(write=False),
           "jacstream, blocks computed and dropped (no store writes: a jacstream.store.NullSink)",
           keeps_result=False),
    Method("jacstream-dask1", "jacstream", _jacstream(),
           "jacstream on a dask LocalCluster of 1 worker process (client=)",
           setup=_local_cluster(1)),
    Method("jacstream-dask2", "jacstream", _jacstream(),
           "jacstream on a dask LocalCluster of 2 worker processes (client=); the memory "
           "budget holds per worker", setup=_local_cluster(2)),
    Method("tf-eager", "tf", _tf(),
           "eager tape.batch_jacobian (the usual answer)"),
    Method("tf-function", "tf", _tf(traced=True),
           "tape.batch_jacobian of the whole output, traced by tf.function"),
    Method("tf-eager-pi50", "tf", _tf(parallel_iterations=50),
           "eager tape.batch_jacobian(parallel_iterations=50)"),
    Method("tf-eager-nopfor", "tf", _tf(experimental_use_pfor=False),
           "eager tape.batch_jacobian(experimental_use_pfor=False)"),
    Method("torch-vmap-jacrev", "torch", _torch_vmap_jacrev(None),
           "torch.func.vmap(torch.func.jacrev(f)) on nn.LSTM + nn.Linear", archs=_LSTM),
    Method("torch-vmap-jacrev-c50", "torch", _torch_vmap_jacrev(50),
           "torch.func.vmap(torch.func.jacrev(f, chunk_size=50))", archs=_LSTM),
    Method("torch-jacobian-vec", "torch", _torch_jacobian_vectorize,
           "torch.autograd.functional.jacobian(f, x[i], vectorize=True) per example",
           archs=_LSTM),
    Method("jax-vmap-jacrev", "jax", _jax_vmap("jacrev"),
           "jax.jit(jax.vmap(jax.jacrev(f)))(x), f a lax.scan LSTM/GRU + Dense with the Keras "
           "weights; the time includes the compilation", archs=_RNN),
    Method("jax-vmap-jacfwd", "jax", _jax_vmap("jacfwd"),
           "jax.jit(jax.vmap(jax.jacfwd(f)))(x), the same f; the time includes the compilation",
           archs=_RNN),
    Method("keras-jax-jacrev", "keras-jax", _jax_vmap("jacrev"),
           "the Keras model itself on the JAX backend: jax.jit(jax.vmap(jax.jacrev(f)))(x) of "
           "model.stateless_call; the time includes the compilation"),
]}


def method_names() -> list[str]:
    return list(METHODS)
