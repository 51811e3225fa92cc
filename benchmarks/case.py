"""One case in its own process: ``python -m benchmarks.case SPEC.json``.

Three modes, all started and watched by :mod:`benchmarks.runner`:

``matmul``
    The machine's float32 matmul rate: NumPy and TensorFlow ``N x N`` matmuls
    for a few seconds each (the faster counts), at the start of a run, so that a case's useful GFLOP/s can be read
    against what this machine does at best.

``prepare``
    Build the workload's Keras model from its seed and save what every case of
    that workload shares: the weights (``weights.npz``), the inputs
    (``inputs.npy``), the model's outputs (``outputs.npy``), the sampled
    (example, step) pairs and the exact reference rows of the Jacobian there
    (``reference.npy``, by ordinary ``tape.gradient``). Doing this once, in its
    own process, keeps the reference's memory out of every case's peak.

``run``
    Load the model (Keras; the equivalent PyTorch module for torch methods; the
    equivalent JAX function for jax methods; Keras on the JAX backend for
    keras-jax ones, with the same weights) and import the method's library
    (TensorFlow, PyTorch, JAX or jacstream: an import is paid once per process,
    not per Jacobian), then run one method under the clock. The PyTorch and
    JAX models' outputs are first compared with the Keras model's
    (``forward_max_err``). Memory is read just before the
    method (the "before" RSS the increase is measured from, and the peak so
    far), the kernel's peak counter is reset, and the peak is read again after
    the method. The sampled rows are then compared with the reference.

The process prints ``@@phase NAME`` lines so the parent can tell which of its
RSS samples fall inside the method, and writes its result as JSON.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .methods import METHODS, Context, Unavailable, jax_model, keras_jax_function, torch_model
from .workloads import Workload, reference

__all__ = ["EXACT_RTOL", "compare", "main", "matmul_rate"]

EXACT_RTOL = 1e-4   # max abs error relative to max |J| on the sampled rows
PHASE = "@@phase"


def phase(name: str, **values: int) -> None:
    """Tell the parent which phase this is (``@@phase method rss_before=123``)."""
    extra = "".join(f" {k}={v}" for k, v in values.items())
    print(f"{PHASE} {name}{extra}", flush=True)


# --------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss() -> int:
    v = _status_kib("VmRSS")
    if v is not None:
        return v
    import psutil

    return int(psutil.Process().memory_info().rss)


def tree_rss(proc: Any = None) -> int:
    """RSS of a process (default: this one) and all its descendants (e.g. dask workers)."""
    import psutil

    proc = proc or psutil.Process()
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def hwm() -> int:
    """Peak RSS since the process started or since the last reset."""
    v = _status_kib("VmHWM")
    if v is not None:
        return v
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- checks
def compare(got: np.ndarray | None, ref: np.ndarray) -> dict[str, Any]:
    """Max abs error of the sampled rows against the reference, relative to max |J|."""
    if got is None:
        return {"max_abs_err": None, "scale": None, "rel_err": None, "exact": None}
    got = np.asarray(got, dtype=np.float64)
    if got.shape != ref.shape:
        return {"max_abs_err": None, "scale": None, "rel_err": None, "exact": False,
                "check_error": f"sampled rows have shape {got.shape}, reference {ref.shape}"}
    err = float(np.max(np.abs(got - ref))) if got.size else 0.0
    if not np.isfinite(got).all():
        err = float("inf")
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = err / scale if scale > 0 else err
    return {"max_abs_err": err, "scale": scale, "rel_err": rel, "exact": bool(rel <= EXACT_RTOL)}


def _classify(e: BaseException) -> str:
    text = f"{type(e).__name__} {e}".lower()
    if isinstance(e, MemoryError) or any(k in text for k in (
            "resourceexhausted", "outofmemory", "out of memory", "can't allocate memory",
            "cannot allocate memory")) or " oom " in f" {text} ":
        return "oom"
    if isinstance(e, Unavailable):
        return "unavailable"
    return "error"


# --------------------------------------------------------------------------- modes
def _load_keras(w: Workload, prep: Path) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    model = w.build_model()
    with np.load(prep / "weights.npz") as z:
        model.set_weights([z[f"w{i}"] for i in range(len(z.files))])
    return model


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Prepare every workload in ``spec["workloads"]`` into the folder ``spec["preps"][k]``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    done: dict[str, Any] = {}
    for wd, where in zip(spec["workloads"], spec["preps"], strict=True):
        w = Workload.from_dict(wd)
        prep = Path(where)
        prep.mkdir(parents=True, exist_ok=True)
        phase(f"prepare {w.key}")
        t0 = time.perf_counter()
        model = w.build_model()
        weights = model.get_weights()
        np.savez(prep / "weights.npz", **{f"w{i}": a for i, a in enumerate(weights)})
        x = w.make_inputs()
        np.save(prep / "inputs.npy", x)
        pairs = w.sample_rows()
        (prep / "pairs.json").write_text(json.dumps(pairs))
        rows, outputs = reference(model, x, pairs)
        np.save(prep / "reference.npy", rows)
        np.save(prep / "outputs.npy", outputs)
        done[w.key] = {"status": "ok", "wall_s": round(time.perf_counter() - t0, 3),
                       "pairs": pairs, "n_weights": int(sum(a.size for a in weights))}
        import keras

        keras.backend.clear_session()
    return {"status": "ok", "workloads": done}


def _load(framework: str, w: Workload, prep: Path, x: np.ndarray, options: dict[str, Any],
          result: dict[str, Any]) -> Any:
    """The model for a method of ``framework``, its library imported; notes versions in ``result``."""
    if framework == "torch":
        import torch

        if options.get("torch_threads"):
            torch.set_num_threads(int(options["torch_threads"]))
        result["threads"] = torch.get_num_threads()
        with np.load(prep / "weights.npz") as z:
            model = torch_model(w, {k: z[k] for k in z.files})
        with torch.no_grad():
            y = model(torch.from_numpy(x)).numpy()
        result["forward_max_err"] = _forward_err(y, prep)
        result["framework_version"] = f"torch {torch.__version__}"
        return model
    if framework in ("jax", "keras-jax"):
        import jax

        result["framework_version"] = f"jax {jax.__version__}"
        if framework == "jax":
            with np.load(prep / "weights.npz") as z:
                f = jax_model(w, {k: z[k] for k in z.files})
        else:
            # The runner sets KERAS_BACKEND=jax for these cases; keras reads it on import.
            os.environ["KERAS_BACKEND"] = "jax"
            try:
                import keras
            except ImportError as e:
                raise Unavailable(f"keras cannot be imported in the JAX interpreter: {e}") from e
            if keras.backend.backend() != "jax":
                raise Unavailable(f"keras runs on {keras.backend.backend()!r}, not on jax "
                                  "(was it imported before KERAS_BACKEND was set?)")
            result["framework_version"] += f", keras {keras.__version__}"
            f = keras_jax_function(_load_keras(w, prep))
        # The forward pass compiles a different function than the method's: no warm-up.
        result["forward_max_err"] = _forward_err(np.asarray(jax.jit(jax.vmap(f))(x)), prep)
        return f
    model = _load_keras(w, prep)
    import tensorflow as tf

    result["framework_version"] = f"tensorflow {tf.__version__}"
    if framework == "jacstream":
        # Imported before the clock, like TensorFlow and PyTorch for theirs:
        # a library is imported once per process, not once per Jacobian.
        import jacstream

        result["framework_version"] += f", jacstream {jacstream.__version__}"
    return model


def _forward_err(y: np.ndarray, prep: Path) -> float:
    """Max abs difference between a peer model's outputs and the Keras model's."""
    return float(np.max(np.abs(y - np.load(prep / "outputs.npy"))))


def _time_matmuls(mm: Callable[[], Any], n: int, seconds: float) -> dict[str, Any]:
    mm()                                           # warm-up: threads, pages, kernels
    flops = 2.0 * n**3
    times: list[float] = []
    t0 = time.perf_counter()
    while not times or time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        mm()
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    return {"gflops": round(flops * len(times) / total / 1e9, 2),
            "gflops_best": round(flops / min(times) / 1e9, 2),
            "reps": len(times), "seconds": round(total, 3)}


def matmul_rate(n: int = 1024, seconds: float = 2.0) -> dict[str, Any]:
    """float32 ``n x n`` matmuls for about ``seconds`` per library: the machine's GFLOP/s.

    NumPy (its BLAS) and, where it imports, TensorFlow (oneDNN/Eigen, the kernels
    jacstream's own matmuls run on) are timed in turn; ``gflops`` is the faster
    library's whole-loop rate (``2 n^3`` flops per matmul), so that a share of it
    is a share of the best this machine does. ``libraries`` holds each one's.

    >>> r = matmul_rate(64, 0.01)
    >>> r["gflops"] > 0 and r["gflops_best"] >= r["gflops"] * 0.5 and r["reps"] >= 1
    True
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    libs = {f"numpy {np.__version__}": _time_matmuls(lambda: np.matmul(a, b, out=out), n,
                                                     seconds)}
    try:
        import tensorflow as tf
    except ImportError:
        pass
    else:
        ta, tb = tf.constant(a), tf.constant(b)
        libs[f"tensorflow {tf.__version__}"] = _time_matmuls(
            lambda: tf.linalg.matmul(ta, tb).numpy(), n, seconds)
    best = max(libs, key=lambda k: libs[k]["gflops"])
    return {**libs[best], "n": n, "dtype": "float32", "library": best,
            "libraries": {k: v["gflops"] for k, v in libs.items()}}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    w = Workload.from_dict(spec["workload"])
    method = METHODS[spec["method"]]
    prep, workdir = Path(spec["prep"]), Path(spec["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    x = np.load(prep / "inputs.npy")
    pairs = [tuple(p) for p in json.loads((prep / "pairs.json").read_text())]
    ref = np.load(prep / "reference.npy")
    result: dict[str, Any] = {"status": "ok"}
    try:
        model = _load(method.framework, w, prep, x, spec.get("options", {}), result)
    except BaseException as e:
        return {"status": _classify(e), "error": f"{type(e).__name__}: {e}"[:2000]}
    ctx = Context(workload=w, x=x, workdir=workdir, model=model,
                  options=spec.get("options", {}))
    teardown = None
    if method.setup is not None:
        try:
            teardown = method.setup(ctx)
        except BaseException as e:
            return {"status": _classify(e), "error": f"setup: {type(e).__name__}: {e}"[:2000]}
    try:
        return _timed(method, ctx, pairs, ref, result)
    finally:
        if teardown is not None:
            teardown()


def _timed(method: Any, ctx: Context, pairs: list[tuple[int, int]], ref: np.ndarray,
           result: dict[str, Any]) -> dict[str, Any]:
    """Run the method under the clock, then check its sampled rows against the reference."""
    # With worker processes started by the setup, "before" counts them too: the
    # parent's samples of the method cover the whole process tree.
    result["rss_before"] = rss() if method.setup is None else tree_rss()
    result["hwm_before"] = hwm()
    result["hwm_reset"] = reset_hwm()
    phase("method", rss_before=result["rss_before"])
    t0 = time.perf_counter()
    try:
        out = method.fn(ctx)
    except BaseException as e:
        result["wall_s"] = time.perf_counter() - t0
        phase("after")
        result["hwm_after"] = hwm()
        result.update(status=_classify(e), error=f"{type(e).__name__}: {e}"[:2000])
        if result["status"] == "error":
            result["traceback"] = traceback.format_exc()[-4000:]
        return result
    result["wall_s"] = time.perf_counter() - t0
    result["hwm_after"] = hwm()
    result["rss_after"] = rss()
    phase("check")
    try:
        result.update(compare(out.sample(pairs), ref))
        result["bytes_on_disk"] = out.bytes_on_disk()
        result["meta"] = out.meta()
    finally:
        out.cleanup()
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    phase("setup")
    if spec["mode"] == "matmul":
        result = {"status": "ok", **matmul_rate(int(spec.get("n", 1024)),
                                                 float(spec.get("seconds", 2.0)))}
    else:
        result = prepare(spec) if spec["mode"] == "prepare" else run(spec)
    Path(spec["result"]).write_text(json.dumps(result, default=str))
    phase("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
