"""Reports: ``results.json`` -> ``report.md`` (tables, targets) and PNG plots.

Pure reading of the results: this can be rerun on an old ``results.json``
(``python -m benchmarks --report-only DIR``) without running anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeGuard

from .methods import PEER_FRAMEWORKS
from .workloads import useful_flops

__all__ = ["TARGETS_FAMILY", "check_exact", "fmt_bytes", "fmt_time", "targets", "update_readme",
           "useful_gflops", "write_report"]

GiB = 2**30
TARGETS_FAMILY = "lstm-h32"
JACSTREAM = "jacstream"
TF_BASELINES = ("tf-eager", "tf-function", "tf-eager-pi50", "tf-eager-nopfor")
FAILED = ("oom", "timeout", "error")

COLUMNS = """\
Columns:
**status**: `ok`; `oom` (killed when its resident memory, children included, passed the
memory cap, or TensorFlow/PyTorch reported running out of memory); `timeout` (killed at the
time limit); `skipped` (not run: it failed at a shorter T, or the time or memory projected
from a shorter T, both growing as T squared, passes 1.5x the timeout or 2x the memory cap); `unavailable` (PyTorch
or JAX is not installed, or the method has no equivalent for this architecture); `error`.
**time**: wall time of the method call alone, in its own process after TensorFlow/PyTorch
is imported and the model built: tracing, the computation, and for jacstream the writes to
disk are included; for killed cases, the time until the kill (`>`).
**peak RSS**: peak resident memory of the case's process (its children included): the max
of the parent's sampling every 50 ms and the kernel's high-water mark (VmHWM) read by the
process before and after the method.
**peak RSS increase**: that peak during the method minus the RSS just before it (TensorFlow
loaded, model built): the memory the Jacobian computation itself costs.
**on disk**: bytes the jacstream store takes (the Jacobian is then deleted); baselines keep
the result in RAM (**result** is its dense float32 size).
**check**: every case's Jacobian rows at sampled (example, output step) pairs against exact
rows from ordinary `tape.gradient` calls; `exact` when max |error| <= {rtol:g} x max |J| (the
relative error is shown); `n/a` for the null sink, which keeps nothing to check.
**useful GFLOP/s**: the arithmetic floor of a causal RNN's Jacobian over the case's time:
T (T + 1) / 2 causal step pairs x 2 S^2 flops per example and input feature (S the state
size: 2H for an LSTM, H for a GRU; empty for the Conv1D model), in parentheses as a share
of the float32 matmul rate measured at the start of the run (header).
"""


# --------------------------------------------------------------------------- formatting
def fmt_time(s: float | None) -> str:
    """Seconds, to 3 significant digits.

    >>> fmt_time(0.0123), fmt_time(12.34), fmt_time(1234.5), fmt_time(None)
    ('0.0123 s', '12.3 s', '1234 s', '-')
    """
    if s is None:
        return "-"
    if s >= 100:
        return f"{s:.0f} s"
    return f"{s:.3g} s"


def fmt_bytes(n: float | None) -> str:
    """Bytes in GiB (or MiB / KiB when small).

    >>> fmt_bytes(3 * 2**30), fmt_bytes(5 * 2**20), fmt_bytes(None)
    ('3.00 GiB', '5.0 MiB', '-')
    """
    if n is None:
        return "-"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _check(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return "-"
    if row.get("exact") is None:
        return "n/a" if not row.get("keeps_result", True) else "-"
    rel = row.get("rel_err")
    rel_s = f" ({rel:.1e})" if rel is not None else ""
    return ("exact" if row["exact"] else "WRONG") + rel_s


def merge_results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs: a later run's case replaces the same case of an earlier one.

    Each case keeps the index of its run (``run``, 1-based); the tables mark cases
    of every run but the first (``²``, ``³``...), and the header lists the runs.
    """
    merged = {k: v for k, v in runs[0].items() if k != "cases"}
    merged["runs"] = [{"started": r.get("started"), "finished": r.get("finished"),
                       "settings": r.get("settings", {}), "n_cases": len(r.get("cases", []))}
                      for r in runs]
    by_id: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(runs, start=1):
        for case in r.get("cases", []):
            by_id[case["id"]] = {**case, "run": i}
        merged.setdefault("workloads", {}).update(r.get("workloads", {}))
        merged.setdefault("methods", {}).update(r.get("methods", {}))
    merged["cases"] = list(by_id.values())
    return merged


_RUN_MARK = {2: "²", 3: "³", 4: "⁴"}


def _cell(row: dict[str, Any] | None) -> str:
    """A pivot-table cell: time and peak RSS, or what went wrong."""
    if row is None:
        return ""
    return _cell_text(row) + _RUN_MARK.get(int(row.get("run") or 1), "")


def _cell_text(row: dict[str, Any]) -> str:
    st = row["status"]
    if st == "ok":
        flag = "" if row.get("exact") in (True, None) else " WRONG"
        return f"{fmt_time(row.get('time_s'))} / {fmt_bytes(row.get('peak_rss'))}{flag}"
    if st in ("oom", "timeout"):
        t = row.get("time_s")
        return f"**{st.upper()}**" + (f" after {fmt_time(t)}" if t else "")
    if st == "skipped":
        return "skipped"
    return st


def useful_gflops(row: dict[str, Any], results: dict[str, Any]) -> float | None:
    """The case's useful GFLOP/s: its workload's arithmetic floor over its time.

    ``None`` for a case that did not finish, or a workload that is not recurrent.
    """
    w = results.get("workloads", {}).get(row.get("workload", ""))
    if not w or row.get("status") != "ok" or not row.get("time_s"):
        return None
    try:
        flops = useful_flops(w["arch"], int(w["T"]), int(w["batch"]), int(w["H"]),
                             int(w["F_in"]))
    except (KeyError, TypeError, ValueError):
        return None
    return None if flops is None else flops / row["time_s"] / 1e9


def matmul_gflops(results: dict[str, Any]) -> float | None:
    """The float32 matmul rate the run measured at its start, in GFLOP/s."""
    rate = (results.get("machine", {}).get("matmul") or {}).get("gflops")
    return float(rate) if rate else None


def _gflops_cell(row: dict[str, Any], results: dict[str, Any]) -> str:
    g = useful_gflops(row, results)
    if g is None:
        return ""
    peak = matmul_gflops(results)
    return f"{g:.3g}" + (f" ({100 * g / peak:.2g}%)" if peak else "")


# --------------------------------------------------------------------------- targets
def _row(rows: list[dict[str, Any]], method: str, T: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["method"] == method and r["T"] == T), None)


def _ok(r: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    return r is not None and r["status"] == "ok" and r.get("exact") is not False


def _js_failed(js: dict[str, Any] | None) -> dict[str, Any]:
    if js is None or js["status"] in ("skipped", "unavailable"):
        return {"measured": "jacstream not run", "met": None}
    return {"measured": f"jacstream {js['status']}"
                        + (" (not exact)" if js["status"] == "ok" else ""), "met": False}


def _speedup(js: dict[str, Any] | None, other: dict[str, Any] | None, need: float,
             what: str, cap: float) -> dict[str, Any]:
    """Is jacstream ``need`` x faster (``what="time"``) or smaller (``"memory"``) than ``other``?

    A baseline killed for memory or time gives a lower bound on the ratio (its
    peak was at least the cap, its time at least the time until the kill): the
    target is met if the bound reaches it, and undetermined otherwise.
    """
    key = "time_s" if what == "time" else "peak_rss"
    show = fmt_time if what == "time" else fmt_bytes
    if not _ok(js):
        return _js_failed(js)
    if other is None or other["status"] not in ("ok", "oom", "timeout"):
        why = "not run" if other is None else f"{other['status']} {other.get('error', '')}"
        return {"measured": f"baseline {why.strip()}", "met": None}
    theirs = other.get(key) or 0
    if what == "memory" and other["status"] == "oom":
        theirs = max(theirs, cap)
    if not theirs or not js.get(key):
        return {"measured": f"baseline {other['status']}, no {what} recorded", "met": None}
    ratio = theirs / js[key]
    bound = other["status"] != "ok"
    ge = ">= " if bound else ""
    text = f"{ge}{ratio:.1f}x (jacstream {show(js[key])} vs {ge}{show(theirs)}"
    text += f", baseline {other['status'].upper()})" if bound else ")"
    if ratio >= need:
        return {"measured": text, "met": True}
    return {"measured": text, "met": None if bound else False}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, computed from the run's own rows; empty without the reference family."""
    rows = [r for r in results.get("cases", []) if r["family"] == TARGETS_FAMILY]
    if not rows:
        return []
    cap = float(results.get("settings", {}).get("mem_cap") or 0)
    out = []
    js300 = _row(rows, JACSTREAM, 300)
    out.append({"target": "jacstream >= 20x faster than eager batch_jacobian, T=300",
                **_speedup(js300, _row(rows, "tf-eager", 300), 20, "time", cap)})
    out.append({"target": "jacstream peak RSS <= 1/4 of eager batch_jacobian's, T=300",
                **_speedup(js300, _row(rows, "tf-eager", 300), 4, "memory", cap)})
    if _ok(js300) and (eager := _row(rows, "tf-eager", 300)) and eager.get("peak_rss_increase") \
            and js300.get("peak_rss_increase"):
        out[-1]["measured"] += (f"; peak RSS increase {fmt_bytes(js300['peak_rss_increase'])} vs "
                                f"{fmt_bytes(eager['peak_rss_increase'])}")
    out.append({"target": "jacstream >= 3x faster than tf.function-traced batch_jacobian, T=300",
                **_speedup(js300, _row(rows, "tf-function", 300), 3, "time", cap)})
    for T in (1000, 3000):
        out.append({"target": f"jacstream (to disk) at least as fast as the best PyTorch path, "
                              f"T={T}", **_vs_torch(rows, T)})
    out.append({"target": "jacstream finishes T=10000 where the TF baselines do not",
                **_longest(rows, 10000)})
    # Issue 18: the recurrent strategy against the strongest peer, the floor and the budget.
    out.append({"target": "jacstream >= 30x faster than eager batch_jacobian, T=300",
                **_speedup(js300, _row(rows, "tf-eager", 300), 30, "time", cap)})
    for T, need in ((1000, 2), (3000, 3)):
        out.append({"target": f"jacstream >= {need}x faster than jax-vmap-jacrev, T={T}",
                    **_speedup(_row(rows, JACSTREAM, T), _row(rows, "jax-vmap-jacrev", T),
                               need, "time", cap)})
    out.append({"target": "jacstream T=10000 in under 150 s, peak RSS increase under its "
                          "memory budget", **_within(rows, results, 10000, 150.0)})
    out.append({"target": "jacstream useful GFLOP/s >= half the matmul rate, T=3000",
                **_share_of_matmul(_row(rows, JACSTREAM, 3000), results, 0.5)})
    return out


def _within(rows: list[dict[str, Any]], results: dict[str, Any], T: int,
            seconds: float) -> dict[str, Any]:
    from jacstream.planning.units import format_bytes, parse_memory

    js = _row(rows, JACSTREAM, T)
    if not _ok(js):
        return _js_failed(js)
    budget = parse_memory(js.get("memory_budget")
                          or results.get("settings", {}).get("memory_budget") or None)
    inc = js.get("peak_rss_increase")
    text = f"{fmt_time(js['time_s'])}"
    if budget is None or inc is None:
        return {"measured": text + ", no budget or peak recorded", "met": None}
    text += f", peak RSS increase {fmt_bytes(inc)} (budget {format_bytes(budget)})"
    return {"measured": text, "met": bool(js["time_s"] < seconds and inc < budget)}


def _share_of_matmul(js: dict[str, Any] | None, results: dict[str, Any],
                     share: float) -> dict[str, Any]:
    if not _ok(js):
        return _js_failed(js)
    g, peak = useful_gflops(js, results), matmul_gflops(results)
    if g is None or not peak:
        return {"measured": "useful GFLOP/s or matmul rate not recorded", "met": None}
    return {"measured": f"{g:.3g} GFLOP/s = {g / peak:.0%} of {peak:.3g} GFLOP/s",
            "met": bool(g >= share * peak)}


def _vs_torch(rows: list[dict[str, Any]], T: int) -> dict[str, Any]:
    js = _row(rows, JACSTREAM, T)
    torch = [r for r in rows if r["framework"] == "torch" and r["T"] == T]
    if not _ok(js):
        return _js_failed(js)
    if not torch or all(r["status"] == "unavailable" for r in torch):
        return {"measured": "PyTorch not measured (unavailable)", "met": None}
    ok = [r for r in torch if _ok(r)]
    if not ok:
        states = ", ".join(f"{r['method']} {r['status']}" for r in torch)
        return {"measured": f"no PyTorch path finished ({states})", "met": True}
    best = min(ok, key=lambda r: r["time_s"])
    ratio = best["time_s"] / js["time_s"]
    return {"measured": f"{ratio:.2f}x ({fmt_time(js['time_s'])} vs {best['method']} "
                        f"{fmt_time(best['time_s'])})", "met": bool(js["time_s"] <= best["time_s"])}


def _longest(rows: list[dict[str, Any]], T: int) -> dict[str, Any]:
    js = _row(rows, JACSTREAM, T)
    base = [_row(rows, m, T) for m in TF_BASELINES]
    states = ", ".join(f"{r['method']}: {r['status']}"
                       + (f" ({r['error']})" if r["status"] == "skipped" else "")
                       for r in base if r is not None)
    if not _ok(js):
        return _js_failed(js)
    if not any(base):
        return {"measured": f"jacstream {fmt_time(js['time_s'])}; no TF baseline in the run",
                "met": None}
    finished = [r for r in base if r is not None and r["status"] == "ok"]
    return {"measured": f"jacstream {fmt_time(js['time_s'])}, {fmt_bytes(js['peak_rss'])}; "
                        f"{states}", "met": not finished}


def check_exact(results: dict[str, Any]) -> list[str]:
    """Cases that ran but whose Jacobian was not exact, or that did not run at all.

    A PyTorch or JAX case recorded as unavailable (its interpreter is not there)
    is not a failure: CI has neither.
    """
    bad = []
    for r in results.get("cases", []):
        if r["status"] == "unavailable" and r.get("framework") in PEER_FRAMEWORKS:
            continue
        if r["status"] != "ok":
            bad.append(f"{r['id']}: {r['status']} ({r.get('error', '')})")
        elif r.get("exact") is False or (r.get("exact") is None and r.get("keeps_result", True)):
            bad.append(f"{r['id']}: not exact (rel err {r.get('rel_err')})")
    return bad


# --------------------------------------------------------------------------- plots
def plot_family(results: dict[str, Any], family: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in results["cases"] if r["family"] == family]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cap = float(results.get("settings", {}).get("mem_cap") or 0)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "time_s", "wall time [s]"),
                           (axes[1], "peak_rss", "peak RSS [GiB]")):
        scale = 1.0 if key == "time_s" else 1 / GiB
        for m in methods:
            mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["T"])
            ok = [(r["T"], r[key] * scale) for r in mine if r["status"] == "ok" and r.get(key)]
            bad = [(r["T"], (r.get(key) or 0) * scale) for r in mine
                   if r["status"] in ("oom", "timeout") and r.get(key)]
            style = "-" if m.startswith("jacstream") else "--" if m.startswith("tf") else ":"
            line = None
            if ok:
                (line,) = ax.plot(*zip(*ok, strict=True), style, marker="o", label=m,
                                  lw=2.5 if m == JACSTREAM else 1.4)
            if bad:
                ax.plot(*zip(*bad, strict=True), "x", ms=10, mew=2,
                        color=line.get_color() if line else None,
                        label=None if line else f"{m} (killed)")
        top = max((r.get(key) or 0) * scale for r in rows)
        if key == "peak_rss" and cap and top > cap / GiB / 8:
            ax.axhline(cap / GiB, color="grey", lw=1, ls="-.", label="memory cap")
        ax.set_xscale("log")
        ax.set_yscale("log")
        Ts = sorted({r["T"] for r in rows})
        ax.set_xticks(Ts, [str(T) for T in Ts])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("T (sequence length)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    wl: dict[str, Any] = next(iter(results["workloads"].values()), {})
    for w in results["workloads"].values():
        if w["name"] == family:
            wl = w
    fig.suptitle(f"{family}: {wl.get('describe', '')}  (x: killed - OOM or timeout)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- markdown
def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]]


def _code(code: dict[str, Any]) -> str:
    """`` (code at <commit>)`` for the header; nothing when the run did not record it."""
    if not code.get("commit"):
        return ""
    return (f" (code at {code['commit'][:10]}"
            + (" with uncommitted changes" if code.get("dirty") else "") + ")")


def _header(results: dict[str, Any]) -> list[str]:
    s = results.get("settings", {})
    m = results.get("machine", {})
    v = m.get("versions", {})
    torch = results.get("torch", {})
    jax = results.get("jax", {})
    matmul = m.get("matmul") or {}
    loads = [r["load_avg_before"] for r in results.get("cases", [])
             if r.get("load_avg_before") is not None]
    runs = results.get("runs") or []
    merged = []
    if len(runs) > 1:
        merged = ["Merged from " + "; ".join(
            f"run {i}{'' if i == 1 else ' (' + _RUN_MARK.get(i, str(i)) + ')'}: "
            f"{r.get('started')} to {r.get('finished') or '(unfinished)'}, {r.get('n_cases')} cases, "
            f"memory_budget={r.get('settings', {}).get('memory_budget')!r}"
            for i, r in enumerate(runs, start=1))
            + ". A case run again in a later run shows the later result, marked with the "
            "run's number.", ""]
    out = merged + [f"Run {results.get('started')} to {results.get('finished', '(unfinished)')} on "
           f"{m.get('cpu')} ({m.get('cpu_count')} CPUs), {fmt_bytes(m.get('memory_total'))} RAM, "
           f"{m.get('platform')}; Python {m.get('python')}, "
           + ", ".join(f"{k} {val}" for k, val in v.items() if val)
           + _code(m.get("code") or {})
           + (f", torch {torch['version']}" if torch.get("version") else
              f"; PyTorch: {torch.get('note')}")
           + (f"; JAX {jax['version']}" + (f", {jax['keras']}" if jax.get("keras") else "")
              if jax.get("version") else f"; JAX: {jax.get('note')}" if jax.get("note") else "")
           + ".", "",
           *([f"float32 matmul rate at the start of the run: **{matmul['gflops']:.1f} GFLOP/s** "
              f"({matmul.get('n')}x{matmul.get('n')} {matmul.get('library', '')} matmuls for "
              f"{matmul.get('seconds')} s; best single one {matmul.get('gflops_best')} "
              "GFLOP/s).", ""] if matmul.get("gflops") else
             [f"float32 matmul rate: not measured ({matmul.get('status')}).", ""]
             if matmul else []),
           f"Limits per case: memory cap {fmt_bytes(float(s.get('mem_cap') or 0))}, timeout "
           f"{fmt_time(s.get('timeout'))} (unless a case sets its own). jacstream runs with "
           f"memory_budget={s.get('memory_budget')!r}"
           + "".join(f"; {r['id']} with memory_budget={r['memory_budget']!r}"
                     for r in results.get("cases", []) if r.get("memory_budget"))
           + ". Each case runs in its own process.", ""]
    if loads:
        busy = max(loads) > (m.get("cpu_count") or 1)
        out += [f"Load average (1 min) before the cases: {min(loads):.1f} to {max(loads):.1f}"
                + (f" - above the {m.get('cpu_count')} CPUs at times (other work on the "
                   "machine, or the threads of the case before still winding down): read "
                   "ratios rather than absolute times." if busy else "."), ""]
    return out


def _targets_md(results: dict[str, Any]) -> list[str]:
    tg = targets(results)
    if not tg:
        return []
    return ["## Targets", "",
            *_table(["target", "measured in this run", "status"],
                    [[t["target"], t["measured"],
                      {True: "**met**", False: "**not met**", None: "not measured"}[t["met"]]]
                     for t in tg]), ""]


def _family_md(results: dict[str, Any], family: str, plot: str | None) -> list[str]:
    rows = [r for r in results.get("cases", []) if r["family"] == family]
    Ts = sorted({r["T"] for r in rows})
    desc = next((w["describe"] for w in results["workloads"].values()
                 if w["name"] == family), "")
    out = [f"## {family}: {desc}", "", "Time / peak RSS of each method:", ""]
    body = [[f"`{meth}`", *[_cell(_row(rows, meth, T)) for T in Ts]]
            for meth in dict.fromkeys(r["method"] for r in rows)]
    out += _table(["method", *[f"T={T}" for T in Ts]], body) + [""]
    if plot:
        out += [f"![{family}]({plot})", ""]
    return out


def markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    s = results.get("settings", {})
    cases = results.get("cases", [])
    out = [f"# jacstream benchmarks: suite `{results.get('suite')}`", "", *_header(results),
           *_targets_md(results)]
    for family in dict.fromkeys(r["family"] for r in cases):
        out += _family_md(results, family, plots.get(family))
    out += ["## All cases", ""]
    body = [[r["id"], r["status"] if r["status"] != "skipped" else
             f"skipped ({str(r.get('error', '')).removeprefix('skipped: ')})",
             (">" if r["status"] in ("oom", "timeout") else "") + fmt_time(r.get("time_s")),
             fmt_bytes(r.get("peak_rss")), fmt_bytes(r.get("peak_rss_increase")),
             fmt_bytes(r.get("bytes_on_disk")), fmt_bytes(r.get("result_nbytes")), _check(r),
             _gflops_cell(r, results)]
            for r in cases]
    out += _table(["case", "status", "time", "peak RSS", "peak RSS increase", "on disk",
                   "result", "check", "useful GFLOP/s"], body) + [""]
    errors = [r for r in cases if r["status"] == "error"]
    if errors:
        out += ["## Errors", ""] + [f"* `{r['id']}`: {str(r.get('error', ''))[:400]}"
                                    for r in errors] + [""]
    out += ["## Methods", ""] + [f"* `{k}`: {val}" for k, val in
                                  results.get("methods", {}).items()] + [""]
    out += [COLUMNS.format(rtol=float(s.get("exact_rtol", 1e-4)))]
    return "\n".join(out)


def _load(results: dict[str, Any] | Path) -> dict[str, Any]:
    if isinstance(results, Path):
        data: dict[str, Any] = json.loads(results.read_text())
        return data
    return results


README_START = "<!-- bench:results:start -->"
README_END = "<!-- bench:results:end -->"


def update_readme(results: dict[str, Any] | Path, output: Path, readme: Path,
                  family: str = TARGETS_FAMILY) -> Path:
    """Put the run's targets, the ``family`` table and its plot into ``readme``.

    The section between ``<!-- bench:results:start -->`` and ``<!-- bench:results:end -->``
    is replaced (appended if the markers are missing); the plot is copied to
    ``results/<suite>-<family>.png`` next to the README.
    """
    import shutil

    results = _load(results)
    images = readme.parent / "results"
    images.mkdir(parents=True, exist_ok=True)
    plot = None
    if (output / f"{family}.png").exists():
        name = f"{results.get('suite')}-{family}.png"
        shutil.copyfile(output / f"{family}.png", images / name)
        plot = f"results/{name}"
    lines = [README_START, "", f"Suite `{results.get('suite')}` (`python -m benchmarks --suite "
             f"{results.get('suite')}`); the full report is `report.md` in its output folder.",
             "", *_header(results), *_targets_md(results)]
    if any(r["family"] == family for r in results.get("cases", [])):
        lines += _family_md(results, family, plot)
    lines += [README_END]
    section = "\n".join(lines)
    text = readme.read_text() if readme.exists() else ""
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        text = head + section + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    readme.write_text(text)
    return readme


def write_report(results: dict[str, Any] | Path, output: Path) -> list[Path]:
    """Write ``report.md`` and one PNG per workload family into ``output``; return the paths."""
    results = _load(results)
    output.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    written = []
    for family in dict.fromkeys(r["family"] for r in results.get("cases", [])):
        if any(r["status"] in ("ok", "oom", "timeout") for r in results["cases"]
               if r["family"] == family):
            p = plot_family(results, family, output / f"{family}.png")
            plots[family] = p.name
            written.append(p)
    md = output / "report.md"
    md.write_text(markdown(results, plots))
    return [md, *written]
