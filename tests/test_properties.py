"""Property: for any shapes, block sizes and out_steps, jacstream matches batch_jacobian or
raises a JacstreamError - and which of the two is decided by rules written down here.

The rules (see ``jacstream.jacobian``): out_steps are ints in ``-T..T-1`` (negative
from the end), strictly increasing once made non-negative, not empty; a slice has a
positive step; ``block_size`` and ``examples_per_block`` are positive ints; inputs are
floating point. A valid call must succeed and agree with ``tf.GradientTape.batch_jacobian``;
an invalid one must raise a ``JacstreamError``; anything else fails.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
from conftest import assert_jacobian_close, reference_jacobian
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import jacstream

MAX_T = 12

# --------------------------------------------------------------------------- models
_models: dict[tuple[Any, ...], Any] = {}


def _model(kind: str, f_in: int, f_out: int) -> tuple[Any, bool]:
    """A model built once per (kind, F_in, F_out); returns (model, is_causal)."""
    key = (kind, f_in, f_out)
    if key not in _models:
        import keras
        import tensorflow as tf

        rng = np.random.default_rng(11)
        if kind in ("fn", "fn_noncausal"):
            w1 = tf.constant(rng.normal(size=(f_in, 3)).astype("float32"))
            w2 = tf.constant(rng.normal(size=(3, f_out)).astype("float32"))
            back = kind == "fn_noncausal"

            def f(x):
                h = tf.einsum("btf,fg->btg", x, w1)
                h = tf.tanh(0.3 * tf.cumsum(h, axis=1) + (0.2 * tf.cumsum(h, axis=1, reverse=True)
                                                          if back else 0.0))
                return tf.einsum("btg,gh->bth", h * h + h, w2)

            _models[key] = (f, not back)
        else:
            keras.utils.set_random_seed(5)
            L = keras.layers
            body = ([L.LSTM(3, return_sequences=True)] if kind == "lstm" else
                    [L.Conv1D(3, 3, padding="causal", activation="tanh")])
            _models[key] = (keras.Sequential([keras.Input((None, f_in)), *body,
                                              L.Dense(f_out)]), True)
    return _models[key]


# --------------------------------------------------------------------------- the rules
def expected_steps(out_steps: Any, t: int) -> np.ndarray | None:
    """The output steps a call selects, or None where the rules call it invalid."""
    if out_steps is None:
        return np.arange(t)
    if isinstance(out_steps, slice):
        if out_steps.step is not None and out_steps.step <= 0:
            return None
        steps = np.arange(t)[out_steps]
    elif isinstance(out_steps, int):
        if not -t <= out_steps < t:
            return None
        steps = np.array([out_steps % t])
    else:
        if any(not -t <= s < t for s in out_steps):
            return None
        steps = np.array([s % t for s in out_steps], dtype=int)
        if np.any(np.diff(steps) <= 0):
            return None
    return steps if len(steps) else None


def _positive_int(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)


@st.composite
def jobs(draw: Any) -> dict[str, Any]:
    """A call to jacstream.jacobian: mostly valid, with one defect in about 4 calls of 10."""
    kind = draw(st.sampled_from(["fn", "conv", "fn_noncausal", "fn", "conv", "lstm"]))
    batch = draw(st.integers(1, 3))
    t = draw(st.integers(1, MAX_T))
    f_in = draw(st.integers(1, 3))
    f_out = draw(st.integers(1, 2))
    step = st.integers(-t, t - 1)
    bound = st.integers(-t - 2, t + 2)
    out_steps = draw(st.one_of(
        # valid by construction
        st.none(), step, st.builds(slice, st.none() | step, st.none() | bound,
                                   st.none() | st.integers(1, 3)),
        st.lists(st.integers(0, t - 1), min_size=1, max_size=5, unique=True).map(sorted),
        # anything, valid or not
        bound, st.builds(slice, st.none() | bound, st.none() | bound,
                         st.none() | st.integers(-2, 3)),
        st.lists(bound, max_size=5)))
    defect = draw(st.sampled_from([None] * 6 + ["dtype", "block_size", "examples", "budget"]))
    return {
        "kind": kind, "batch": batch, "t": t, "f_in": f_in, "f_out": f_out,
        "out_steps": out_steps,
        "dtype": ("int32" if defect == "dtype" else
                  draw(st.sampled_from(["float32", "float64", "float16"]))),
        "block_size": (draw(st.sampled_from([0, -1, 2.5, True])) if defect == "block_size" else
                       draw(st.none() | st.integers(1, t + 2))),
        "examples_per_block": (draw(st.sampled_from([0, -2])) if defect == "examples" else
                               draw(st.none() | st.integers(1, batch + 1))),
        "memory_budget": ("1KiB" if defect == "budget" else
                          draw(st.sampled_from([None, "1GiB"]))),
        "strategy": draw(st.sampled_from(["pfor", "tile"])),
        "causal": draw(st.sampled_from(["auto", False, True])),
        "seed": draw(st.integers(0, 2**16)),
    }


# --------------------------------------------------------------------------- the property
@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(job=jobs())
def test_matches_batch_jacobian_or_raises_jacstream_error(job: dict[str, Any]) -> None:
    model, is_causal = _model(job["kind"], job["f_in"], job["f_out"])
    causal = job["causal"] if (job["causal"] is not True or is_causal) else "auto"
    x = np.random.default_rng(job["seed"]).normal(
        size=(job["batch"], job["t"], job["f_in"])).astype(job["dtype"])
    steps = expected_steps(job["out_steps"], job["t"])
    valid = (steps is not None and job["dtype"] != "int32" and job["memory_budget"] != "1KiB"
             and _positive_int(job["block_size"]) and _positive_int(job["examples_per_block"]))
    event("valid" if valid else "invalid")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            J = jacstream.jacobian(
                model, x, f"{tmp}/j.zarr", out_steps=job["out_steps"],
                block_size=job["block_size"], examples_per_block=job["examples_per_block"],
                memory_budget=job["memory_budget"], strategy=job["strategy"], causal=causal,
                progress=False)
        except jacstream.JacstreamError as e:
            event(f"refused: {type(e).__name__}")
            assert not valid, f"a valid call was refused: {type(e).__name__}: {e}"
            return
        # Any other exception propagates and fails the test: it is neither outcome.
        assert valid, "an invalid call was accepted"
        event(f"computed ({job['kind']}, {job['strategy']})")
        np.testing.assert_array_equal(J.out_steps, steps)
        ref = reference_jacobian(model, x.astype("float32"))[:, steps]
        assert_jacobian_close(J[...], ref, str(job))
