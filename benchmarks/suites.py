"""Suites: which methods run on which workloads, in which order.

``quick``  small models, every TensorFlow method and jacstream variant, under
           3 minutes on 2 cores; CI runs it to check the runner works and every
           result is exact (timings are not checked). Its few cheap JAX cases
           run only where a JAX interpreter is given (``--jax-python``); without
           one (CI) they are recorded as unavailable, which the check accepts.
``full``   the reference model over T = 100 ... 10000 against every baseline
           (PyTorch and JAX included),
           jacstream's variants (strategies, causal=False, no store, a dask
           LocalCluster of 1 and 2 workers), plus a wide, a bigger, a GRU and
           a causal Conv1D model at T=300; about 90 minutes on 2 cores.
``smoke``  one tiny LSTM, jacstream at two lengths and eager at one (the test suite).

Cases of one method on one family are listed in increasing T: the runner
skips the longer ones once a shorter one failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .runner import Case
from .workloads import Workload

__all__ = ["JAX_METHODS", "REFERENCE", "SUITES", "TF_BASELINES", "TORCH_METHODS", "cases_for"]

# The model the person we build for trained (see shared NOTES): batch 10, LSTM(32), 1 -> 1.
REFERENCE = Workload("lstm-h32", "lstm", T=100)
REFERENCE_TS = (100, 300, 600, 1000, 3000, 10000)

JACSTREAM_VARIANTS = ("jacstream-pfor", "jacstream-tile", "jacstream-noncausal",
                      "jacstream-nullsink")
DASK_VARIANTS = ("jacstream-dask1", "jacstream-dask2")
TF_BASELINES = ("tf-eager", "tf-function", "tf-eager-pi50", "tf-eager-nopfor")
TORCH_METHODS = ("torch-jacobian-vec", "torch-vmap-jacrev", "torch-vmap-jacrev-c50")
JAX_METHODS = ("jax-vmap-jacrev", "jax-vmap-jacfwd", "keras-jax-jacrev")


def cases_for(workload: Workload, methods: Iterable[str], Ts: Iterable[int],
              timeouts: dict[int, float] | None = None) -> list[Case]:
    """Every method at every T (method-major, T increasing)."""
    timeouts = timeouts or {}
    return [Case(workload.with_T(T), m, timeouts.get(T)) for m in methods for T in sorted(Ts)]


def full() -> list[Case]:
    ref = REFERENCE
    # jacstream at T=10000 (the longest case by far) runs last, so that a cut-short
    # run still holds every comparison at the smaller T.
    cases = cases_for(ref, ["jacstream"], REFERENCE_TS[:-1])
    cases += cases_for(ref, JACSTREAM_VARIANTS, (300, 1000))
    cases += cases_for(ref, ["jacstream-nullsink"], (3000,))  # writer hidden behind compute?
    cases += cases_for(ref, ["jacstream-noncausal"], (3000,))  # causal gain once compute dominates
    cases += cases_for(ref, DASK_VARIANTS, (1000, 3000))       # 1 vs 2 dask worker processes
    cases += cases_for(ref, TF_BASELINES, REFERENCE_TS)
    cases += cases_for(ref, TORCH_METHODS, REFERENCE_TS)
    cases += cases_for(ref, JAX_METHODS, REFERENCE_TS)
    others = [Workload("lstm-wide", "lstm", T=300, F_in=8, F_out=8),
              Workload("lstm-h256", "lstm", T=300, H=256),
              Workload("gru-h32", "gru", T=300),
              Workload("conv-h32", "conv", T=300)]
    for w in others:
        methods = ["jacstream", "tf-eager", "tf-function"]
        if w.arch == "lstm":
            methods.append("torch-jacobian-vec")
        if w.arch in ("lstm", "gru"):
            methods.append("jax-vmap-jacrev")
        methods.append("keras-jax-jacrev")
        cases += cases_for(w, methods, [w.T])
    # T=10000 with the run's budget (1 GiB): the default picks the sensitivity sweep, whose
    # working set does not grow with the rows of a block. pfor at T=10000 needs 4 GiB to be
    # practical (with 1 GiB a block holds ~74 rows and TensorFlow's while loop costs ~0.1 ms
    # per block and step: 30% of the work in 15 minutes), so it runs with that budget.
    cases.append(Case(ref.with_T(10000), "jacstream", 2400.0))
    cases.append(Case(ref.with_T(10000), "jacstream-pfor", 2400.0, memory_budget="4GiB"))
    return cases


def quick() -> list[Case]:
    lstm = Workload("lstm-h16", "lstm", T=30, batch=4, H=16)
    cases = cases_for(lstm, ["jacstream", "tf-eager"], (30, 60))
    cases += cases_for(lstm, ["tf-function", *JACSTREAM_VARIANTS[1:]], (60,))
    cases += cases_for(lstm, ["tf-eager-nopfor"], (30,))
    cases += cases_for(lstm, ["tf-eager-pi50"], (60,))      # 60 rows: two chunks of 50
    cases += cases_for(lstm, ["jacstream-dask2"], (60,))
    cases += cases_for(lstm, ["jax-vmap-jacrev", "keras-jax-jacrev"], (60,))
    for w in (Workload("lstm-wide", "lstm", T=30, batch=3, H=8, F_in=3, F_out=3),
              Workload("gru-h8", "gru", T=40, batch=3, H=8),
              Workload("conv-h8", "conv", T=40, batch=3, H=8)):
        cases += cases_for(w, ["jacstream"], (w.T,))
    cases += cases_for(Workload("gru-h8", "gru", T=40, batch=3, H=8), ["jax-vmap-jacrev"], (40,))
    return cases


def smoke() -> list[Case]:
    w = Workload("lstm-h4", "lstm", T=10, batch=2, H=4)
    return cases_for(w, ["jacstream"], (10, 20)) + cases_for(w, ["tf-eager"], (10,))


SUITES: dict[str, Callable[[], list[Case]]] = {"quick": quick, "full": full, "smoke": smoke}
