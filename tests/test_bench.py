"""The benchmark runner: workloads, process watching, skips, targets, reports, and a
tiny suite run end to end through real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_jacobian_close

from benchmarks.case import EXACT_RTOL, compare
from benchmarks.report import check_exact, targets, useful_gflops, write_report
from benchmarks.runner import Case, Settings, _skip_reason, monitor, run_cases
from benchmarks.suites import SUITES
from benchmarks.workloads import Workload

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30


# --------------------------------------------------------------------------- workloads
WORKLOADS = [
    Workload("lstm-h4", "lstm", T=12, batch=2, H=4),
    Workload("wide", "lstm", T=9, batch=3, H=4, F_in=3, F_out=2),
    Workload("gru", "gru", T=7, batch=1, H=3),
    Workload("conv", "conv", T=15, batch=2, H=4, kernel=2),
]


@pytest.mark.parametrize("w", WORKLOADS, ids=lambda w: w.key)
def test_workload_inputs_and_samples_are_deterministic(w: Workload) -> None:
    x = w.make_inputs()
    assert x.shape == (w.batch, w.T, w.F_in) and x.dtype == np.float32
    np.testing.assert_array_equal(x, w.make_inputs())   # the same seeded generator again
    pairs = w.sample_rows()
    assert pairs == w.sample_rows()
    assert (0, w.T - 1) in pairs and len(set(pairs)) == len(pairs)
    assert all(0 <= i < w.batch and 0 <= t < w.T for i, t in pairs)
    assert Workload.from_dict(w.to_dict()) == w
    assert w.result_nbytes == w.batch * w.T * w.F_out * w.T * w.F_in * 4


@pytest.mark.parametrize("bad", [{"arch": "rnn"}, {"T": 0}, {"H": -1}])
def test_workload_rejects_bad_fields(bad: dict) -> None:
    with pytest.raises(ValueError):
        Workload(**{"name": "x", "arch": "lstm", "T": 5, **bad})


def test_build_model_is_deterministic_and_has_reference_shape() -> None:
    w = WORKLOADS[1]
    a, b = w.build_model(), w.build_model()
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)   # the same seeded initializers again
    assert a.output_shape == (None, None, w.F_out)
    assert [type(layer).__name__ for layer in a.layers] == ["InputLayer", "LSTM",
                                                             "TimeDistributed"]


@pytest.mark.parametrize("w", WORKLOADS, ids=lambda w: w.key)
def test_reference_rows_match_batch_jacobian(w: Workload) -> None:
    import tensorflow as tf

    from benchmarks.workloads import reference

    model, x = w.build_model(), w.make_inputs()
    pairs = w.sample_rows()
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model(xt)
    J = tape.batch_jacobian(y, xt).numpy()
    want = np.stack([J[i, t] for i, t in pairs])
    got, outputs = reference(model, x, pairs)
    assert compare(got, want)["exact"]
    assert_jacobian_close(outputs, y.numpy(), "reference outputs vs an eager call")


def test_useful_flops_is_the_causal_recurrent_floor() -> None:
    ref = Workload("lstm-h32", "lstm", T=1000)
    # 500500 causal pairs x 2 x 64^2 flops x 10 examples: the NOTES' ~41 GFLOP at T=1000
    assert ref.useful_flops == 500500 * 2 * 64**2 * 10 == 41_000_960_000
    assert Workload("g", "gru", T=4, batch=3, H=5, F_in=2).useful_flops == 10 * 2 * 25 * 3 * 2
    assert Workload("w", "lstm", T=1, batch=1, H=1, F_in=8, F_out=7).useful_flops == 8 * 8
    assert Workload("c", "conv", T=300).useful_flops is None


# --------------------------------------------------------------------------- checks
@pytest.mark.parametrize(("noise", "exact"), [(0.0, True), (0.1 * EXACT_RTOL, True),
                                              (10 * EXACT_RTOL, False)])
def test_compare_is_relative_to_the_largest_entry(noise: float, exact: bool) -> None:
    ref = np.random.default_rng(0).normal(size=(3, 1, 8, 1)) * 5
    got = ref + noise * np.abs(ref).max()
    out = compare(got, ref)
    assert out["exact"] is exact
    assert out["rel_err"] == pytest.approx(noise, abs=1e-12)


def test_compare_flags_nan_and_shape_mismatch() -> None:
    ref = np.ones((2, 1, 4, 1))
    assert compare(ref * np.nan, ref)["exact"] is False
    assert compare(np.ones((2, 1, 3, 1)), ref)["exact"] is False
    assert compare(None, ref)["exact"] is None


# --------------------------------------------------------------------------- monitor
def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_monitor_kills_past_the_memory_cap() -> None:
    m = monitor(_py("""
        import time
        print("@@phase method", flush=True)
        blocks = []
        for _ in range(200):
            blocks.append(bytearray(20 * 2**20))
            time.sleep(0.02)
        time.sleep(30)
        """), mem_cap=150 * 2**20, timeout=60, poll=0.02)
    assert m.status == "oom"
    assert m.peak_rss > 150 * 2**20 and m.method_peak_rss > 150 * 2**20
    assert m.wall_s < 30 and m.method_s is not None


def test_monitor_kills_at_the_timeout_and_its_children_too(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    m = monitor(_py(f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(marker)!r}, "w").write(str(p.pid))
        time.sleep(60)
        """), mem_cap=8 * GiB, timeout=3, poll=0.05)
    assert m.status == "timeout" and m.wall_s < 20
    child = int(marker.read_text())
    import psutil

    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"


def test_monitor_records_phases_and_exit_code() -> None:
    m = monitor(_py("""
        print("@@phase setup"); print("hello")
        print("@@phase method rss_before=1234", flush=True)
        import sys; sys.exit(3)
        """), mem_cap=8 * GiB, timeout=30)
    assert (m.status, m.returncode, m.phases) == ("exited", 3, ["setup", "method"])
    assert m.values == {"rss_before": 1234}
    assert "hello" in m.log_tail


# --------------------------------------------------------------------------- skips
def _row(method: str, T: int, status: str = "ok", time_s: float = 1.0,
         peak: float = GiB, inc: float | None = None, family: str = "lstm-h32",
         framework: str | None = None, **kw: object) -> dict:
    fw = framework or ("jacstream" if method.startswith("jacstream") else
                       "torch" if method.startswith("torch") else "tf")
    return {"id": f"{family}-T{T}/{method}", "family": family, "T": T, "method": method,
            "framework": fw, "status": status, "time_s": time_s, "peak_rss": peak,
            "peak_rss_increase": inc, "exact": True if status == "ok" else None,
            "keeps_result": True, "result_nbytes": 4 * T * T, **kw}


SKIPS = [
    # (method, history rows, T asked, expected reason prefix or None)
    ("tf-eager", [_row("tf-eager", 300, "oom")], 1000, "skipped: oom at T=300"),
    ("tf-eager", [_row("tf-eager", 300, "timeout")], 1000, "skipped: timeout at T=300"),
    ("tf-eager", [_row("tf-eager", 300, time_s=100)], 600, None),
    ("tf-eager", [_row("tf-eager", 300, time_s=100)], 3000, "skipped: projected"),
    ("tf-eager", [_row("tf-eager", 300, inc=4 * GiB)], 1000, "skipped: projected"),
    ("jacstream", [_row("jacstream", 1000, time_s=500)], 10000, None),
    ("jacstream", [_row("jacstream", 1000, "oom")], 10000, "skipped: oom at T=1000"),
]


@pytest.mark.parametrize(("method", "history", "T", "want"), SKIPS)
def test_skip_rules(method: str, history: list, T: int, want: str | None,
                    tmp_path: Path) -> None:
    case = Case(Workload("lstm-h32", "lstm", T=T), method)
    settings = Settings(output=tmp_path, mem_cap=16 * GiB, timeout=600)
    got = _skip_reason(case, {("lstm-h32", method): history}, settings, 600)
    assert (got is None) if want is None else got.startswith(want), got


# --------------------------------------------------------------------------- targets
def _results(rows: list[dict]) -> dict:
    return {"suite": "test", "settings": {"mem_cap": 16 * GiB, "timeout": 600.0,
                                          "exact_rtol": EXACT_RTOL},
            "machine": {"versions": {}}, "torch": {}, "methods": {},
            "workloads": {"lstm-h32-T300": {"name": "lstm-h32", "describe": "reference"}},
            "cases": rows}


GOOD = [_row("jacstream", 300, time_s=2, peak=0.8 * GiB),
        _row("tf-eager", 300, time_s=50, peak=4 * GiB),
        _row("tf-function", 300, time_s=7, peak=3 * GiB),
        _row("jacstream", 1000, time_s=10), _row("torch-jacobian-vec", 1000, time_s=27),
        _row("jacstream", 3000, time_s=80), _row("torch-jacobian-vec", 3000, "timeout"),
        _row("jacstream", 10000, time_s=900),
        _row("tf-eager", 10000, "skipped", error="skipped: oom at T=1000"),
        _row("tf-function", 10000, "skipped", error="skipped: oom at T=1000")]

# The issue-18 targets: 30x eager (25x here), 2x / 3x jax-vmap-jacrev (not in these rows),
# T=10000 in 150 s under the budget (no budget or peak in GOOD), useful GFLOP/s (no workloads).
_NEW = [False, None, None, None, None]
TARGET_TABLE = [
    ("all met", GOOD, [True, True, True, True, True, True, *_NEW]),
    ("eager only 10x slower", [_row("tf-eager", 300, time_s=20, peak=4 * GiB) if
                               r["method"] == "tf-eager" and r["T"] == 300 else r for r in GOOD],
     [False, True, True, True, True, True, *_NEW]),
    ("eager OOM at T=300: memory bound met, time undetermined",
     [_row("tf-eager", 300, "oom", time_s=30, peak=16.1 * GiB) if
      r["method"] == "tf-eager" and r["T"] == 300 else r for r in GOOD],
     [None, True, True, True, True, True, None, *_NEW[1:]]),
    ("torch faster at T=1000", [_row("torch-jacobian-vec", 1000, time_s=5) if
                                r["method"].startswith("torch") and r["T"] == 1000 else r
                                for r in GOOD], [True, True, True, False, True, True, *_NEW]),
    ("jacstream wrong at T=10000", [_row("jacstream", 10000, "timeout") if
                                    r["method"] == "jacstream" and r["T"] == 10000 else r
                                    for r in GOOD],
     [True, True, True, True, True, False, False, None, None, False, None]),
    ("no jacstream case at T=10000", [r for r in GOOD if r["T"] != 10000 or
                                      r["method"] != "jacstream"],
     [True, True, True, True, True, None, False, None, None, None, None]),
    ("torch unavailable", [r for r in GOOD if not r["method"].startswith("torch")],
     [True, True, True, None, None, True, *_NEW]),
    ("the issue-18 targets met", [_row("jacstream", 300, time_s=1.5, peak=0.8 * GiB),
                                  *GOOD[1:-3], _row("jacstream", 10000, time_s=60,
                                                   inc=0.6 * GiB, memory_budget="1GiB"),
                                  *GOOD[-2:], _row("jax-vmap-jacrev", 1000, time_s=25),
                                  _row("jax-vmap-jacrev", 3000, time_s=300)],
     [True, True, True, True, True, True, True, True, True, True, None]),
    ("T=10000 over its budget", [*GOOD[:-3], _row("jacstream", 10000, time_s=60,
                                                  inc=1.2 * GiB, memory_budget="1GiB"),
                                 *GOOD[-2:]],
     [True, True, True, True, True, True, *_NEW[:3], False, None]),
]


@pytest.mark.parametrize(("label", "rows", "want"), TARGET_TABLE, ids=[t[0] for t in TARGET_TABLE])
def test_targets_are_computed_from_the_run(label: str, rows: list, want: list) -> None:
    got = targets(_results(rows))
    assert [t["met"] for t in got] == want, [(t["target"], t["measured"]) for t in got]


def test_readme_section_is_replaced_in_place(tmp_path: Path) -> None:
    from benchmarks.report import README_END, README_START, update_readme

    out = tmp_path / "out"
    write_report(_results(GOOD), out)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{README_START}\nstale text\n{README_END}\n\n## After\n")
    for _ in range(2):
        update_readme(_results(GOOD), out, readme)
    text = readme.read_text()
    assert text.startswith("# Title") and text.rstrip().endswith("## After")
    assert "stale text" not in text and text.count(README_START) == 1 and "## Targets" in text
    assert (tmp_path / "results" / "test-lstm-h32.png").exists()
    assert "](results/test-lstm-h32.png)" in text


def test_report_renders_failures_targets_and_plots(tmp_path: Path) -> None:
    rows = GOOD + [_row("tf-eager", 1000, "oom", time_s=80, peak=16.2 * GiB),
                   _row("tf-eager-nopfor", 300, "error", error="boom")]
    paths = write_report(_results(rows), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Targets" in md and "**met**" in md
    assert "**OOM** after 80 s" in md and "## Errors" in md
    assert (tmp_path / "lstm-h32.png").stat().st_size > 10_000
    assert paths[0] == tmp_path / "report.md"
    assert check_exact(_results(rows)) != []


def test_merged_runs_take_the_later_case_and_say_so(tmp_path: Path) -> None:
    from benchmarks.__main__ import main
    from benchmarks.report import merge_results

    first = _results(GOOD)
    redo = _row("jacstream", 300, time_s=0.5)
    second = {**_results([redo]), "started": "second-run"}
    merged = merge_results([first, second])
    got = [r for r in merged["cases"] if r["id"] == redo["id"]]
    assert len(got) == 1 and got[0]["time_s"] == 0.5 and got[0]["run"] == 2
    assert len(merged["cases"]) == len(first["cases"])
    assert all(r["run"] == 1 for r in merged["cases"] if r["id"] != redo["id"])
    # through the command line, as the README's results were made
    for name, res in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    assert main(["--report-only", "--output", str(tmp_path / "m"), "--merge",
                 str(tmp_path / "a"), "--merge", str(tmp_path / "b")]) == 0
    md = (tmp_path / "m" / "report.md").read_text()
    assert "Merged from run 1" in md and "run 2 (²): second-run" in md and "²" in md


def test_report_shows_useful_gflops_against_the_matmul_rate(tmp_path: Path) -> None:
    rows = [_row("jacstream", 1000, time_s=2.0, workload="lstm-h32-T1000"),
            _row("tf-eager", 1000, "oom", time_s=80, workload="lstm-h32-T1000"),
            _row("jacstream", 300, time_s=1.0, family="conv-h32", workload="conv-h32-T300")]
    res = _results(rows)
    res["workloads"] = {"lstm-h32-T1000": Workload("lstm-h32", "lstm", T=1000).to_dict(),
                        "conv-h32-T300": Workload("conv-h32", "conv", T=300).to_dict()}
    for w in res["workloads"].values():
        w["describe"] = "x"
    res["machine"]["matmul"] = {"gflops": 41.0, "gflops_best": 45.0, "n": 1024,
                                "seconds": 2.0, "library": "numpy"}
    assert useful_gflops(rows[0], res) == pytest.approx(20.50048)
    assert useful_gflops(rows[1], res) is None and useful_gflops(rows[2], res) is None
    write_report(res, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "float32 matmul rate at the start of the run: **41.0 GFLOP/s**" in md
    assert "| 20.5 (50%) |" in md and "useful GFLOP/s" in md


def test_unavailable_peers_do_not_fail_the_check() -> None:
    rows = [_row("jax-vmap-jacrev", 60, "unavailable", framework="jax"),
            _row("keras-jax-jacrev", 60, "unavailable", framework="keras-jax"),
            _row("torch-vmap-jacrev", 60, "unavailable")]
    assert check_exact(_results(rows)) == []
    assert check_exact(_results([_row("tf-eager", 60, "unavailable")])) != []


def test_suites_list_their_cases_in_increasing_T() -> None:
    for name, make in SUITES.items():
        cases = make()
        assert cases, name
        seen: dict = {}
        for c in cases:
            key = (c.workload.name, c.method)
            assert c.workload.T > seen.get(key, 0), (name, c.id)
            seen[key] = c.workload.T
    assert not any(c.method.startswith("torch") for c in SUITES["quick"]())
    full = {c.id for c in SUITES["full"]()}
    for m in ("jax-vmap-jacrev", "jax-vmap-jacfwd", "keras-jax-jacrev"):
        assert {f"lstm-h32-T{T}/{m}" for T in (100, 300, 1000, 3000)} <= full
    assert "gru-h32-T300/jax-vmap-jacrev" in full


# --------------------------------------------------------------------------- end to end
def test_smoke_suite_runs_end_to_end(tmp_path: Path) -> None:
    """A tiny LSTM, jacstream at two lengths and eager at one, through real subprocesses."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--suite", "smoke", "--output",
                           str(out), "--timeout", "240", "--mem-cap", "8GiB"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["versions"]["tensorflow"]
    matmul = results["machine"]["matmul"]     # measured in its own process at the start
    assert matmul["status"] == "ok" and matmul["n"] == 1024 and matmul["reps"] >= 1
    assert 0 < matmul["gflops"] <= matmul["gflops_best"] * 1.01
    # The code the cases ran: this checkout's commit (CI and users run from a clone).
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    code = results["machine"]["code"]
    assert Path(code["path"]) == ROOT.resolve()
    if head:
        assert code["commit"] == head and isinstance(code["dirty"], bool)
    cases = results["cases"]
    assert {c["method"] for c in cases} == {"jacstream", "tf-eager"} and len(cases) == 3
    for c in cases:
        assert c["status"] == "ok" and c["exact"] is True, c
        assert c["rel_err"] <= EXACT_RTOL and c["time_s"] > 0
        assert c["peak_rss"] >= c["rss_before"] > 0 and c["peak_rss_increase"] >= 0
        assert ((c["bytes_on_disk"] or 0) > 0) == (c["method"] == "jacstream")
    md = (out / "report.md").read_text()
    assert md.count("exact (") == 3 and "WRONG" not in md
    assert f"**{matmul['gflops']:.1f} GFLOP/s**" in md
    assert not head or f"(code at {head[:10]}" in md
    assert (out / "lstm-h4.png").stat().st_size > 10_000
    assert list((out / "logs").glob("*.log"))


def test_phases_tool_splits_one_call() -> None:
    """``python -m benchmarks.phases`` times the phases of a real call in a child process."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.phases", "--T", "20",
                           "--strategy", "tile", "--repeat", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("median: ")
    for phase in ("checks", "detect_causal", "build", "probes", "blocks", "total"):
        assert f"{phase} " in lines[0], (phase, lines[0])
    assert "tile" in lines[0]


# --------------------------------------------------------------------------- JAX peers
JAX_CASES = [Case(Workload("lstm-j", "lstm", T=12, batch=2, H=4, F_in=2, F_out=2), m)
             for m in ("jax-vmap-jacrev", "jax-vmap-jacfwd", "keras-jax-jacrev")] + \
            [Case(Workload("gru-j", "gru", T=9, batch=2, H=3, F_in=2), m)
             for m in ("jax-vmap-jacrev", "keras-jax-jacrev")] + \
            [Case(Workload("conv-j", "conv", T=9, batch=2, H=3), m)
             for m in ("jax-vmap-jacrev", "keras-jax-jacrev")]


def _jax_python() -> str | None:
    """``JACSTREAM_JAX_PYTHON``, or this interpreter if it has jax (None: no JAX here)."""
    import importlib.util

    exe = os.environ.get("JACSTREAM_JAX_PYTHON")
    return exe or (sys.executable if importlib.util.find_spec("jax") else None)


def test_jax_cases_are_unavailable_without_a_jax_interpreter(tmp_path: Path) -> None:
    """As in CI: no JAX interpreter, so the JAX cases are recorded as unavailable, with why."""
    settings = Settings(output=tmp_path, timeout=240, matmul_seconds=0,
                        jax_python=str(tmp_path / "no-such-python"))
    res = run_cases(JAX_CASES[:3], settings, log=lambda _: None)
    assert [c["status"] for c in res["cases"]] == ["unavailable"] * 3
    assert all("no-such-python" in c["error"] for c in res["cases"])
    assert res["jax"]["python"] is None and "no-such-python" in res["jax"]["note"]
    assert "matmul" not in res["machine"] and check_exact(res) == []


@pytest.mark.skipif(_jax_python() is None,
                    reason="no JAX here: set JACSTREAM_JAX_PYTHON to an interpreter with jax, "
                           "numpy and keras (e.g. /work/jaxenv/bin/python)")
def test_jax_cases_match_the_keras_model(tmp_path: Path) -> None:
    """The lax.scan LSTM/GRU with the Keras weights, and Keras itself on the JAX backend."""
    settings = Settings(output=tmp_path, timeout=240, matmul_seconds=0, jax_python=_jax_python())
    res = run_cases(JAX_CASES, settings, log=lambda _: None)
    assert res["jax"]["version"] and res["jax"]["keras"], res["jax"]
    by_id = {c["id"]: c for c in res["cases"]}
    for case in JAX_CASES:
        c = by_id[case.id]
        if case.id == "conv-j-T9/jax-vmap-jacrev":      # no lax.scan model for Conv1D
            assert c["status"] == "unavailable"
            continue
        assert c["status"] == "ok" and c["exact"] is True, c
        assert c["rel_err"] < 1e-5 and c["forward_max_err"] < 1e-5, c
        assert c["framework_version"].startswith("jax "), c
    assert check_exact(res) == []
