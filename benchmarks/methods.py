"""Methods: the ways of computing a per-example Jacobian that the benchmark compares.

Each method is a function run inside a case process (see :mod:`benchmarks.case`)
on a :class:`Context` (the workload, its inputs, the model). The case process
times the call; the function returns an :class:`Output` that can afterwards,
off the clock, hand out the Jacobian rows of the sampled (example, step)
pairs for the correctness check, report bytes on disk, and clean up.

Frameworks are imported inside the functions only: the TensorFlow methods run
in the TensorFlow interpreter, the PyTorch ones in an interpreter that has
torch (which need not have TensorFlow).
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

__all__ = ["METHODS", "Context", "Method", "Output", "Unavailable", "method_names"]

Pairs = list[tuple[int, int]]


class Unavailable(RuntimeError):
    """The method cannot run here (a missing package or feature); recorded, not an error."""


@dataclass
class Context:
    """What a method gets: the workload, its inputs and its model, and a scratch folder."""

    workload: Workload
    x: np.ndarray
    workdir: Path
    model: Any = None          # keras.Model (TensorFlow methods) or torch module (PyTorch)
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
    framework: str            # "jacstream", "tf" or "torch"
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


# --------------------------------------------------------------------------- registry
_LSTM = ("lstm",)
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
]}


def method_names() -> list[str]:
    return list(METHODS)
