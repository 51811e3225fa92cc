"""The runner: every case in its own watched subprocess, results to JSON.

For each (workload, method) the runner starts ``python -m benchmarks.case``
in a new session, samples the resident memory of the process and its
children every ``poll`` seconds, and kills the whole process group when the
memory passes the cap (status ``oom``) or the time runs out (``timeout``),
so a baseline that explodes is recorded instead of taking the machine down.

Cases of one method on one workload family run in order of ``T``; after a
failure at some ``T`` the longer ones are recorded as skipped. Baselines are
also skipped where the time or memory projected from a shorter run (both
grow as T squared for a full Jacobian) passes 1.5 times the timeout or twice
the memory cap; jacstream itself is never skipped on a projection.

The PyTorch and JAX cases run in the interpreters given (``--torch-python``,
``--jax-python``); where one is missing, its cases are recorded as
unavailable. Before the workloads are prepared, one process measures the
machine's float32 matmul rate (``machine.matmul`` in the results), against
which the report reads each case's useful GFLOP/s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .case import EXACT_RTOL, PHASE, tree_rss
from .methods import METHODS, PEER_FRAMEWORKS
from .workloads import Workload

__all__ = ["Case", "Monitored", "Settings", "machine_info", "monitor", "peer_interpreter",
           "run_cases"]

ROOT = Path(__file__).resolve().parent.parent      # puts `benchmarks` on the children's path
GiB = 2**30
# Skip a baseline when its projection passes this many times the limit (time, memory).
TIME_MARGIN = 1.5
MEMORY_MARGIN = 2.0


@dataclass(frozen=True)
class Case:
    """One method on one workload; ``timeout`` and ``memory_budget`` override the run's."""

    workload: Workload
    method: str
    timeout: float | None = None
    memory_budget: str | None = None   # jacstream's budget in this case (None: the run's)

    @property
    def id(self) -> str:
        return f"{self.workload.key}/{self.method}"


@dataclass
class Settings:
    output: Path
    mem_cap: int = 16 * GiB
    timeout: float = 600.0
    torch_python: str | None = None       # None: this interpreter if it has torch
    memory_budget: str | None = "1GiB"    # jacstream's memory_budget in every case
    torch_threads: int | None = None      # torch.set_num_threads in PyTorch cases
    jax_python: str | None = None         # None: this interpreter if it has jax
    matmul_seconds: float = 2.0           # the matmul-rate measurement (0: none)
    poll: float = 0.05
    tmp: Path | None = None
    suite: str = "custom"


@dataclass
class Monitored:
    """What the parent saw of one child process."""

    status: str                 # "exited", "oom" or "timeout"
    returncode: int | None
    wall_s: float
    peak_rss: int
    method_peak_rss: int
    method_s: float | None      # time from the "method" phase to its end or the kill
    phases: list[str] = field(default_factory=list)
    values: dict[str, int] = field(default_factory=dict)   # key=value from phase lines
    log_tail: str = ""


# --------------------------------------------------------------------------- one process
def monitor(cmd: Sequence[str], *, mem_cap: int, timeout: float, poll: float = 0.05,
            env: dict[str, str] | None = None, log_path: Path | None = None,
            cwd: Path | None = None) -> Monitored:
    """Run ``cmd``, sampling its RSS (children included); kill it past ``mem_cap`` or ``timeout``.

    Lines the child prints that start with ``@@phase`` name the phase it is
    in; RSS samples taken in phase ``method`` also count toward
    ``method_peak_rss``.

    Examples
    --------
    >>> m = monitor([sys.executable, "-c", "print('@@phase method')"], mem_cap=2**34, timeout=30)
    >>> m.status, m.returncode, m.phases
    ('exited', 0, ['method'])
    """
    log = open(log_path, "w") if log_path is not None else None  # noqa: SIM115
    tail: list[str] = []
    state: dict[str, Any] = {"phase": "start", "phases": [], "t_method": None, "t_end": None,
                             "values": {}}
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", env=env, cwd=cwd,
                            start_new_session=True, bufsize=1)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PHASE):
                name, *values = line[len(PHASE):].split()
                for kv in values:
                    k, _, v = kv.partition("=")
                    if v.isdigit():
                        state["values"][k] = int(v)
                now = time.perf_counter()
                if state["phase"] == "method" and state["t_end"] is None:
                    state["t_end"] = now
                if name == "method":
                    state["t_method"] = now
                state["phase"] = name
                state["phases"].append(name)
            if log is not None:
                log.write(line)
            tail.append(line)
            del tail[:-40]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ps = psutil.Process(proc.pid)
    peak = method_peak = 0
    status = "exited"
    while proc.poll() is None:
        r = tree_rss(ps)
        peak = max(peak, r)
        if state["phase"] == "method":
            method_peak = max(method_peak, r)
        if r > mem_cap:
            status = "oom"
        elif time.perf_counter() - t0 > timeout:
            status = "timeout"
        if status != "exited":
            _kill(proc, ps)
            break
        time.sleep(poll)
    now = time.perf_counter()
    if state["phase"] == "method" and state["t_end"] is None:
        state["t_end"] = now
    proc.wait()
    reader.join(timeout=5)
    if state["t_method"] is not None and state["t_end"] is None:
        # The child exited before the reader saw its last phase line (a slow machine):
        # the method ran until the exit seen above, at the earliest when it began.
        state["t_end"] = max(now, state["t_method"])
    if log is not None:
        log.close()
    method_s = (state["t_end"] - state["t_method"]) if state["t_method"] is not None else None
    return Monitored(status, proc.returncode, now - t0, peak, method_peak, method_s,
                     list(state["phases"]), dict(state["values"]), "".join(tail)[-3000:])


def _kill(proc: subprocess.Popen[str], ps: psutil.Process) -> None:
    """SIGKILL the case's process group and every descendant, and wait until they are gone.

    A signal is delivered asynchronously: without the wait a grandchild could
    still be running (and holding memory) when the next case starts.
    """
    try:
        tree = [ps, *ps.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    for p in tree[1:]:  # descendants that left the group (setsid) are killed one by one
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in tree[1:]):
        time.sleep(0.02)


def _alive(p: psutil.Process) -> bool:
    """Whether ``p`` still runs (a zombie has already released its memory)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --------------------------------------------------------------------------- environment
def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def peer_interpreter(module: str, requested: str | None) -> tuple[str | None, str]:
    """The interpreter for a peer's cases (``torch``, ``jax``) and its version, or (None, why not).

    ``requested`` is the ``--torch-python`` / ``--jax-python`` given; without it,
    this interpreter if it has the module.
    """
    exe = requested or sys.executable
    if requested is None and importlib.util.find_spec(module) is None:
        return None, f"{module} is not installed here (pass --{module}-python)"
    try:
        out = subprocess.run([exe, "-c", f"import {module}, numpy; print({module}.__version__)"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{exe}: {e}"
    if out.returncode != 0:
        return None, f"{exe} cannot import {module} and numpy: {out.stderr.strip()[-300:]}"
    return exe, out.stdout.strip()


def torch_interpreter(requested: str | None) -> tuple[str | None, str]:
    """The interpreter for PyTorch cases and its torch version, or (None, why not)."""
    return peer_interpreter("torch", requested)


# Keras on the JAX backend: its cases run in the JAX interpreter with this in the environment.
KERAS_JAX_ENV = {"KERAS_BACKEND": "jax"}


def keras_on_jax(exe: str) -> tuple[str | None, str]:
    """Keras' version in the JAX interpreter ``exe`` on the JAX backend, or (None, why not)."""
    code = "import keras; assert keras.backend.backend() == 'jax'; print(keras.__version__)"
    try:
        out = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=120,
                             env=_child_env(KERAS_JAX_ENV))
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{exe}: {e}"
    if out.returncode != 0:
        return None, (f"{exe} cannot import keras on the JAX backend: "
                      f"{out.stderr.strip()[-300:]}")
    return out.stdout.strip(), ""


def peers(cases: Sequence[Case], settings: Settings) -> dict[str, tuple[str | None, str]]:
    """For each peer framework of the run: (its interpreter, its version) or (None, why not)."""
    frameworks = {METHODS[c.method].framework for c in cases}
    out: dict[str, tuple[str | None, str]] = {}
    if "torch" in frameworks:
        out["torch"] = peer_interpreter("torch", settings.torch_python)
    if frameworks & {"jax", "keras-jax"}:
        out["jax"] = peer_interpreter("jax", settings.jax_python)
    if "keras-jax" in frameworks:
        exe, info = out["jax"]
        keras_version, why = keras_on_jax(exe) if exe else (None, info)
        out["keras-jax"] = (exe, f"keras {keras_version}") if keras_version else (None, why)
    return out


def _version(*dists: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for d in dists:
        try:
            return version(d)
        except PackageNotFoundError:
            continue
    return None


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    js_version: str | None = None
    try:
        from jacstream._version import __version__ as js_version
    except Exception:
        pass
    return {
        "code": code_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "memory_total": psutil.virtual_memory().total,
        "python": sys.version.split()[0],
        "versions": {
            "jacstream": js_version,
            "tensorflow": _version("tensorflow-cpu", "tensorflow"),
            "keras": _version("keras"),
            "numpy": _version("numpy"),
            "zarr": _version("zarr"),
        },
    }


def code_version() -> dict[str, Any]:
    """The git commit of the jacstream the cases import, and whether it has local changes.

    ``{"path", "commit", "dirty"}``; only ``path`` when it is not a git checkout.
    """
    spec = importlib.util.find_spec("jacstream")
    if spec is None or not spec.origin:
        return {}
    root = Path(spec.origin).resolve().parent.parent
    info: dict[str, Any] = {"path": str(root)}
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=30, check=True).stdout.strip()

        info["commit"] = git("rev-parse", "HEAD")
        info["dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# --------------------------------------------------------------------------- cases
def _spawn(spec: dict[str, Any], python: str, settings: Settings, name: str,
           timeout: float, env: dict[str, str] | None = None
           ) -> tuple[Monitored, dict[str, Any] | None]:
    logs = settings.output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    safe = name.replace("/", "__")
    spec_path = Path(spec["workdir"]) / f"{safe}.spec.json"
    spec["result"] = str(Path(spec["workdir"]) / f"{safe}.result.json")
    Path(spec["workdir"]).mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    mon = monitor([python, "-m", "benchmarks.case", str(spec_path)], mem_cap=settings.mem_cap,
                  timeout=timeout, poll=settings.poll, env=_child_env(env),
                  log_path=logs / f"{safe}.log", cwd=ROOT)
    result = None
    if mon.status == "exited" and Path(spec["result"]).exists():
        result = json.loads(Path(spec["result"]).read_text())
    return mon, result


def _merge(case: Case, mon: Monitored, res: dict[str, Any] | None,
           timeout: float) -> dict[str, Any]:
    """One row of results from the parent's view and the child's own report."""
    row: dict[str, Any] = {"id": case.id, "workload": case.workload.key,
                           "family": case.workload.name, "T": case.workload.T,
                           "method": case.method, "framework": METHODS[case.method].framework,
                           "timeout_s": timeout, "process_s": round(mon.wall_s, 3)}
    if case.memory_budget is not None:
        row["memory_budget"] = case.memory_budget
    res = res or {}
    if mon.status in ("oom", "timeout"):
        row["status"] = mon.status
        row["error"] = ("killed: RSS passed the memory cap" if mon.status == "oom"
                        else f"killed: no result after {timeout:.0f} s")
    elif res:
        row["status"] = res.get("status", "error")
        if "error" in res:
            row["error"] = res["error"]
    elif mon.returncode is not None and mon.returncode < 0 and \
            -mon.returncode == signal.SIGKILL:
        row["status"], row["error"] = "oom", "killed by SIGKILL (the kernel's OOM killer?)"
    else:
        row["status"] = "error"
        row["error"] = f"exit code {mon.returncode}; log tail: {mon.log_tail[-1500:]}"
    # Time: the child's clock when it finished, else the parent's view of the method.
    row["time_s"] = res.get("wall_s", mon.method_s if mon.status != "exited" else None)
    hwm_before, hwm_after = res.get("hwm_before") or 0, res.get("hwm_after") or 0
    row["peak_rss"] = max(mon.peak_rss, hwm_before, hwm_after)
    method_hwm = hwm_after if (res.get("hwm_reset") or hwm_after != hwm_before) else 0
    method_peak = max(mon.method_peak_rss, method_hwm)
    before = res.get("rss_before") or mon.values.get("rss_before")
    row["rss_before"] = before
    row["peak_rss_increase"] = max(0, method_peak - before) if before and method_peak else None
    for k in ("max_abs_err", "scale", "rel_err", "exact", "bytes_on_disk", "meta",
              "forward_max_err", "framework_version", "threads", "check_error", "traceback"):
        if k in res:
            row[k] = res[k]
    row["result_nbytes"] = case.workload.result_nbytes
    row["keeps_result"] = METHODS[case.method].keeps_result
    return row


def _skip_reason(case: Case, history: dict[tuple[str, str], list[dict[str, Any]]],
                 settings: Settings, timeout: float) -> str | None:
    past = [r for r in history.get((case.workload.name, case.method), [])
            if r["T"] < case.workload.T]
    failed = [r for r in past if r["status"] in ("oom", "timeout", "error")]
    if failed:
        r = failed[-1]
        return f"skipped: {r['status']} at T={r['T']}"
    unavailable = [r for r in past if r["status"] == "unavailable"]
    if unavailable:
        return "unavailable"
    if METHODS[case.method].framework == "jacstream":
        return None
    ok = [r for r in past if r["status"] == "ok" and r.get("time_s")]
    if not ok:
        return None
    r = ok[-1]
    grow = (case.workload.T / r["T"]) ** 2
    t_proj = r["time_s"] * grow
    if t_proj > TIME_MARGIN * timeout:
        return f"skipped: projected {t_proj:.0f} s from T={r['T']} (timeout {timeout:.0f} s)"
    if r.get("peak_rss_increase"):
        m_proj = r["peak_rss_increase"] * grow
        if m_proj > MEMORY_MARGIN * settings.mem_cap:
            return (f"skipped: projected {m_proj / GiB:.0f} GiB from T={r['T']} "
                    f"(cap {settings.mem_cap / GiB:.0f} GiB)")
    return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def run_cases(cases: Sequence[Case], settings: Settings,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prepare the workloads, run every case, write ``results.json``; return the results."""
    out = settings.output
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="jacstream-bench-", dir=settings.tmp))
    interpreters = peers(cases, settings)
    torch_exe, torch_info = interpreters.get("torch", (None, "no torch case in this run"))
    jax_exe, jax_info = interpreters.get("jax", (None, "no JAX case in this run"))
    keras_exe, keras_info = interpreters.get("keras-jax", (None, "no keras-jax case in this run"))
    results: dict[str, Any] = {
        "suite": settings.suite,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {**{k: str(v) if isinstance(v, Path) else v
                        for k, v in asdict(settings).items()}, "exact_rtol": EXACT_RTOL},
        "machine": machine_info(),
        "torch": {"python": torch_exe, "version": torch_info if torch_exe else None,
                  "note": None if torch_exe else torch_info},
        "jax": {"python": jax_exe, "version": jax_info if jax_exe else None,
                "note": None if jax_exe else jax_info,
                "keras": keras_info if keras_exe else None,
                "keras_note": None if keras_exe else keras_info},
        "methods": {name: m.summary for name, m in METHODS.items()
                    if any(c.method == name for c in cases)},
        "workloads": {},
        "cases": [],
    }
    json_path = out / "results.json"

    # 0. The machine's float32 matmul rate, before anything else loads it.
    if settings.matmul_seconds > 0:
        results["machine"]["matmul"] = measure_matmul(settings, scratch, log)

    # 1. Inputs, weights and exact references, for all workloads in one process.
    workloads = list(dict.fromkeys(c.workload for c in cases))
    prepared: dict[Workload, str | None] = {}
    for w in workloads:
        results["workloads"][w.key] = {**w.to_dict(), "key": w.key, "describe": w.describe(),
                                       "result_nbytes": w.result_nbytes}
    def prepare(group: list[Workload]) -> None:
        preps = [scratch / "prep" / w.key for w in group]
        spec = {"mode": "prepare", "workloads": [w.to_dict() for w in group],
                "preps": [str(p) for p in preps], "workdir": str(scratch / "specs")}
        name = "prepare" if len(group) > 1 else f"prepare-{group[0].key}"
        log(f"prepare {', '.join(w.key for w in group)} ...")
        mon, res = _spawn(spec, sys.executable, settings, name,
                          settings.timeout * max(1, len(group) // 4))
        done = (res or {}).get("workloads", {})
        for w, p in zip(group, preps, strict=True):
            info = done.get(w.key)
            prepared[w] = str(p) if info else None
            results["workloads"][w.key]["prepare"] = info or {
                "status": mon.status if mon.status != "exited" else "error",
                "log_tail": mon.log_tail[-1500:]}

    prepare(workloads)
    if len(workloads) > 1:   # a failure in the shared process: retry each one on its own
        for w in [w for w in workloads if prepared.get(w) is None]:
            prepare([w])
    _write_json(json_path, results)

    # 2. The cases, in the order given.
    history: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for n, case in enumerate(cases, 1):
        timeout = case.timeout or settings.timeout
        method = METHODS[case.method]
        skip = _skip_reason(case, history, settings, timeout)
        peer = interpreters.get(method.framework) if method.framework in PEER_FRAMEWORKS else None
        if skip is None and peer is not None and peer[0] is None:
            skip = "unavailable"
        if skip is None and case.workload.arch not in method.archs:
            skip = "unavailable"
        if skip is None and prepared.get(case.workload) is None:
            skip = "error"
        if skip is not None:
            status = "skipped" if skip.startswith("skipped") else skip
            row = {"id": case.id, "workload": case.workload.key, "family": case.workload.name,
                   "T": case.workload.T, "method": case.method, "framework": method.framework,
                   "status": status, "error": skip if status != "unavailable" else
                   (peer[1] if peer is not None and peer[0] is None else
                    f"{case.method} does not run arch {case.workload.arch!r}"),
                   "result_nbytes": case.workload.result_nbytes,
                   "keeps_result": method.keeps_result}
            if status == "error":
                row["error"] = "the workload's preparation failed"
        else:
            python = peer[0] if peer is not None else sys.executable
            assert python is not None
            spec: dict[str, Any] = {"mode": "run", "workload": case.workload.to_dict(), "method": case.method,
                    "prep": prepared[case.workload],
                    "workdir": str(scratch / "cases" / case.id.replace("/", "__")),
                    "options": {"memory_budget": case.memory_budget or settings.memory_budget,
                                "torch_threads": settings.torch_threads}}
            log(f"[{n}/{len(cases)}] {case.id} ...")
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            mon, res = _spawn(spec, python, settings, case.id, timeout,
                              KERAS_JAX_ENV if method.framework == "keras-jax" else None)
            row = _merge(case, mon, res, timeout)
            row["load_avg_before"] = load
            _rmtree(Path(spec["workdir"]))
        history.setdefault((case.workload.name, case.method), []).append(row)
        results["cases"].append(row)
        log(f"    {_one_line(row)}")
        _write_json(json_path, results)

    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json(json_path, results)
    _rmtree(scratch)
    return results


def measure_matmul(settings: Settings, scratch: Path,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """The float32 matmul rate (GFLOP/s) of this machine now, in its own process."""
    log(f"matmul rate ({settings.matmul_seconds:g} s each of 1024x1024 float32 NumPy and "
        "TensorFlow matmuls) ...")
    spec = {"mode": "matmul", "n": 1024, "seconds": settings.matmul_seconds,
            "workdir": str(scratch / "specs")}
    mon, res = _spawn(spec, sys.executable, settings, "matmul",
                      max(120.0, 20 * settings.matmul_seconds))
    if res is None:
        return {"status": mon.status if mon.status != "exited" else "error",
                "log_tail": mon.log_tail[-1500:]}
    log(f"    {res['gflops']:.1f} GFLOP/s (best single matmul {res['gflops_best']:.1f})")
    return res


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _one_line(row: dict[str, Any]) -> str:
    parts = [row["status"]]
    if row.get("time_s") is not None:
        parts.append(f"{row['time_s']:.1f} s")
    if row.get("peak_rss"):
        parts.append(f"peak {row['peak_rss'] / GiB:.2f} GiB")
    if row.get("rel_err") is not None:
        parts.append(f"rel err {row['rel_err']:.1e}")
    if row.get("error") and row["status"] != "ok":
        parts.append(str(row["error"]).splitlines()[0][:120])
    return ", ".join(parts)
