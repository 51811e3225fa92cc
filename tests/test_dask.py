"""Distributed runs on a real dask LocalCluster (2 worker processes).

One cluster serves the whole module (each worker imports TensorFlow once).
Every distributed result is compared bit for bit with a local run of the same
job: a worker loads the same weights, prepares the model and traces the block
function as the local run does, and computes the same blocks with the same
strategy and shapes on the same machine, with as many TensorFlow threads as
this process (the fixture sees to that). The local run is compared with
``tf.GradientTape.batch_jacobian``, another computation, to float32 rounding. To interrupt
runs or kill a worker mid-block deterministically, the workers' completion
markers are slowed down through ``client.run`` (the marker is written after a
block's chunks, so a kill during the delay leaves written but unmarked chunks).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
from conftest import assert_jacobian_close

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

import jacstream  # noqa: E402
from jacstream.errors import BudgetError, InputError, NonFiniteError, StoreWriteError  # noqa: E402
from jacstream.store import JobStore  # noqa: E402
from jacstream.store.jobstore import done_dir  # noqa: E402

# Test helpers and models defined here are shipped to the workers by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BATCH, T, F_IN = 4, 40, 2
OPTS = {"block_size": 4, "examples_per_block": 2, "progress": False}   # 10 x 2 = 20 blocks
N_BLOCKS = 20


# --------------------------------------------------------------------------- models and data
def lstm_model():
    """LSTM with a TimeDistributed head: exercises the .keras payload and model rewrite."""
    import keras

    keras.utils.set_random_seed(1234)
    inp = keras.Input((None, F_IN))
    h = keras.layers.LSTM(6, return_sequences=True)(inp)
    return keras.Model(inp, keras.layers.TimeDistributed(keras.layers.Dense(1))(h))


def callable_model():
    """A plain function of TF ops closing over constants: exercises the cloudpickle payload."""
    import tensorflow as tf

    rng = np.random.default_rng(7)
    w1 = tf.constant(rng.normal(size=(F_IN, 3)).astype("float32"))
    w2 = tf.constant(rng.normal(size=(3, 2)).astype("float32"))

    def f(x):
        h = tf.tanh(tf.cumsum(tf.einsum("btf,fg->btg", x, w1), axis=1) * 0.3)
        return tf.einsum("btg,gh->bth", h, w2)

    return f


def lambda_model():
    """A Lambda layer: Keras' safe mode would refuse to load it on the workers."""
    import keras

    keras.utils.set_random_seed(99)
    return keras.Sequential([keras.Input((None, F_IN)), keras.layers.Lambda(lambda t: t * 2.0),
                             keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)])


def sqrt_model():
    """|x| as sqrt(x * x): its autodiff derivative is NaN at x == 0 (inf * 0)."""
    import tensorflow as tf

    def f(x):
        return tf.sqrt(x * x)

    return f


def inputs(seed=0):
    return np.random.default_rng(seed).normal(size=(BATCH, T, F_IN)).astype("float32")


def reference(model, x):
    import tensorflow as tf

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model(xt)
    return tape.batch_jacobian(y, xt).numpy()


def full(result):
    return np.asarray(result.array[...])


# --------------------------------------------------------------------------- worker helpers
def slow_markers(seconds):
    """On a worker: delay every completion marker by ``seconds`` (0 restores)."""
    from jacstream.store import JobStore as Store

    orig = Store.__dict__.get("_orig_mark_done") or Store._mark_done
    Store._orig_mark_done = orig
    if seconds:
        def slow(self, index):
            time.sleep(seconds)
            orig(self, index)
        Store._mark_done = slow
    else:
        Store._mark_done = orig


def _executing(dask_worker):
    return len(dask_worker.state.executing) + len(dask_worker.state.long_running)


def wait_idle(client, timeout=30.0):
    """Wait until no worker runs a task (a cancelled task still finishes its block)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(client.run(_executing).values()):
            return
        time.sleep(0.05)
    raise AssertionError("the cluster did not go idle")


def in_thread(call):
    """Start ``call()`` in a thread: the thread, and a dict that gets its "result" or "error"."""
    out = {}

    def run():
        try:
            out["result"] = call()
        except BaseException as e:   # surfaced by finish_after_kill
            out["error"] = e

    th = threading.Thread(target=run)
    th.start()
    return th, out


def finish_after_kill(client, th, out, pid):
    """Kill worker process ``pid``; the run in ``th`` must still finish: its result."""
    os.kill(pid, signal.SIGKILL)
    th.join(120)
    try:
        client.run(slow_markers, 0)
    except Exception:
        pass
    assert not th.is_alive(), "the distributed run did not finish after a worker died"
    assert "error" not in out, out.get("error")
    return out["result"]


def n_markers(path):
    d = done_dir(path)
    return sum(n.endswith(".done") for n in os.listdir(d)) if os.path.isdir(d) else 0


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    # Workers import TensorFlow before they register (a worker restarted after a
    # kill too), so that no task of a run waits on the import. The nanny sets
    # OMP_NUM_THREADS=1 in its workers, which TensorFlow takes as its number of
    # intra-op threads: give them this process's, so that a block is computed with
    # the same threads (and the same reduction splits) on both sides.
    threads = os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           memory_limit="3GiB", dashboard_address=":0",
                           silence_logs=logging.ERROR, preload=["jacstream.engine.build"],
                           env={"OMP_NUM_THREADS": threads})
    c = Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


@pytest.fixture(scope="module")
def lstm_local(tmp_path_factory):
    """The local run every LSTM distributed run must equal bit for bit."""
    model, x = lstm_model(), inputs()
    # strategy fixed: "auto" times trials, and two strategies agree only to rounding
    res = jacstream.jacobian(model, x, tmp_path_factory.mktemp("local") / "j.zarr",
                             strategy="pfor", **OPTS)
    assert res.complete and res.n_blocks == N_BLOCKS
    assert_jacobian_close(full(res), reference(model, x), "local pfor vs batch_jacobian")
    return model, x, full(res)


# --------------------------------------------------------------------------- tests
CASES = [  # (model, inputs as zarr on disk?, strategy)
    pytest.param("lstm", False, "pfor", id="keras-numpy-pfor"),
    pytest.param("callable", True, "tile", id="callable-zarr-tile"),
    pytest.param("lambda", False, "pfor", id="keras-lambda-pfor"),
]


@pytest.mark.parametrize(("which", "as_zarr", "strategy"), CASES)
def test_distributed_equals_local_bitwise(client, tmp_path, request, which, as_zarr, strategy):
    import zarr

    if which == "lstm":
        model, x, expected = request.getfixturevalue("lstm_local")
    else:
        model, x = {"callable": callable_model, "lambda": lambda_model}[which](), inputs()
        local = jacstream.jacobian(model, x, tmp_path / "local.zarr", strategy=strategy, **OPTS)
        expected = full(local)
        assert_jacobian_close(expected, reference(model, x), f"local {strategy} vs batch_jacobian")
    xin = x
    if as_zarr:   # workers read their slabs from the zarr array themselves
        xin = zarr.create_array(str(tmp_path / "x.zarr"), shape=x.shape, dtype="float32",
                                chunks=(2, T, F_IN))
        xin[...] = x
    seen = []
    dist = jacstream.jacobian(model, xin, tmp_path / "dist.zarr", strategy=strategy,
                              client=client, on_block=seen.append, **OPTS)
    assert dist.complete
    assert sorted(b.index for b in seen) == list(range(N_BLOCKS))
    # Bitwise: the same traced function on the same blocks (module docstring).
    assert full(dist).tobytes() == expected.tobytes(), "distributed != local (bitwise)"
    assert dist.plan.strategy == strategy

    run = dist.attrs["runs"][-1]
    assert run["executor"] == "dask" and run["blocks_computed"] == N_BLOCKS
    workers = run["workers"]
    assert sum(w["blocks"] for w in workers.values()) == N_BLOCKS
    # Each worker process loads and traces once (twice at most: static fallback), not per task.
    assert all(w["traces"] <= 2 for w in workers.values()), workers
    assert max(w["traces"] for w in workers.values()) >= 1


def test_runs_resume_across_executors(client, tmp_path, lstm_local, monkeypatch):
    """local (crashes after 5 blocks) -> dask (interrupted) -> local: one identical result."""
    model, x, expected = lstm_local
    path = tmp_path / "j.zarr"

    # 1. A local run that dies after 5 blocks (a simulated write failure).
    orig = JobStore.write_block
    local_blocks = []

    def failing(self, plan, block, data, durable=True):
        if len(local_blocks) == 5:
            raise StoreWriteError("simulated crash")
        local_blocks.append(block.index)
        return orig(self, plan, block, data, durable)

    monkeypatch.setattr(JobStore, "write_block", failing)
    with pytest.raises(StoreWriteError):
        jacstream.jacobian(model, x, path, strategy="pfor", **OPTS)
    monkeypatch.setattr(JobStore, "write_block", orig)
    assert n_markers(path) == 5

    # 2. The distributed run resumes it, and is itself interrupted after 3 more blocks.
    dist_blocks = []

    def stop_after_three(block):
        dist_blocks.append(block.index)
        if len(dist_blocks) == 3:
            raise RuntimeError("stop")

    client.run(slow_markers, 0.1)     # so that the run is still going after 3 blocks
    try:
        with pytest.raises(RuntimeError, match="stop"):
            jacstream.jacobian(model, x, path, client=client, on_block=stop_after_three,
                               **OPTS)
        wait_idle(client)             # blocks already running finish and are kept
    finally:
        client.run(slow_markers, 0)
    assert not set(dist_blocks) & set(local_blocks)    # done blocks were not redone
    done = n_markers(path)
    assert 8 <= done < N_BLOCKS

    # 3. A local run finishes it.
    res = jacstream.jacobian(model, x, path, **OPTS)
    assert res.complete
    assert res.stats["blocks_skipped"] == done
    assert res.stats["blocks_computed"] == N_BLOCKS - done
    # Bitwise: every block by pfor on the stored plan, locally or on a worker (docstring).
    assert full(res).tobytes() == expected.tobytes()
    assert [r.get("executor", "local") for r in res.attrs["runs"]] == ["local"]


def test_nonfinite_block_raises_in_client(client, tmp_path):
    x = inputs(1)
    x[3, 5, 0] = 0.0        # NaN at J[3, 5, 0, 5, 0]: block 3 (output steps 4-7, examples 2-3)
    with pytest.raises(NonFiniteError, match="block 3 .*NaN/Inf.*examples \\[3\\]"):
        jacstream.jacobian(sqrt_model(), x, tmp_path / "a.zarr", client=client, causal=False,
                           **OPTS)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        res = jacstream.jacobian(sqrt_model(), x, tmp_path / "b.zarr", client=client,
                                 causal=False, on_nonfinite="warn", **OPTS)
    assert res.complete
    assert res.attrs["runs"][-1]["nonfinite_blocks"] == [3]
    assert np.isnan(res[3, 5, 0, 5, 0]) and np.isfinite(res[0]).all()


def test_memory_budget_is_per_worker(client, tmp_path):
    from jacstream.planning import CostModel, make_plan
    from jacstream.run.dask import _preflight, default_worker_budget

    assert default_worker_budget(client) == 3 * 2**30 // 4      # a quarter of memory_limit
    big = make_plan((4, 40, 2), (4, 40, 1), block_size=4, cost=CostModel(fixed=4 * 2**30))
    with pytest.raises(BudgetError, match="memory limit of worker"):
        _preflight(client, big, tmp_path)


def test_not_a_client_is_rejected(tmp_path):
    with pytest.raises(InputError, match="dask.distributed.Client"):
        jacstream.jacobian(lambda x: x, inputs(), tmp_path / "j.zarr", client=object())


def test_connect_to_missing_scheduler_says_what_to_do():
    from jacstream.errors import ClusterError
    from jacstream.run.dask import connect

    with pytest.raises(ClusterError, match="dask scheduler") as info:
        connect("tcp://127.0.0.1:9", timeout=0.5)
    assert isinstance(info.value, ConnectionError)


def test_forward_mode_on_dask_equals_local_bitwise(client, tmp_path):
    """Workers run the block function the client validated: forward mode's implementation too.

    Through a Keras LSTM the ForwardAccumulator cannot trace (no forward rule for its loop),
    so the client picks the transpose implementation; workers must use the same one.
    """
    model, x = lstm_model(), inputs(2)
    local = jacstream.jacobian(model, x, tmp_path / "local.zarr", strategy="forward", **OPTS)
    assert local.attrs["strategy_choice"]["forward_impl"] == "transpose"
    ref = reference(model, x)
    np.testing.assert_allclose(full(local), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    dist = jacstream.jacobian(model, x, tmp_path / "dist.zarr", strategy="forward",
                              client=client, **OPTS)
    assert dist.complete and dist.plan.strategy == "forward"
    assert dist.attrs["runs"][-1]["executor"] == "dask"
    assert full(dist).tobytes() == full(local).tobytes(), "distributed != local (bitwise)"


def test_killed_worker_still_gives_complete_identical_result(client, tmp_path, lstm_local):
    """Runs last: it kills a worker process (its nanny starts a new one)."""
    model, x, expected = lstm_local
    path = tmp_path / "j.zarr"
    pids = client.run(os.getpid)
    victim_addr, victim = sorted(pids.items())[0]
    # Most of each block's time is then spent between its chunks and its marker.
    client.run(slow_markers, 0.15)
    th, out = in_thread(lambda: jacstream.jacobian(model, x, path, client=client,
                                                   strategy="pfor", **OPTS))
    end = time.monotonic() + 60
    while time.monotonic() < end and th.is_alive() and not (
            n_markers(path) >= 8 and client.run(_executing, workers=[victim_addr])[victim_addr]):
        time.sleep(0.01)
    done_at_kill = n_markers(path)
    res = finish_after_kill(client, th, out, victim)
    assert 8 <= done_at_kill < N_BLOCKS, done_at_kill
    assert res.complete and n_markers(path) == N_BLOCKS
    # Bitwise: the same traced function on the same blocks, whichever worker ran them.
    assert np.array_equal(full(res), expected)
    assert victim not in client.run(os.getpid).values()


def test_sensitivity_distributed_equals_local_bitwise(client, tmp_path):
    """The sweep on workers: blocks of a slab may reach a worker out of order or split
    between workers (each then sweeps from step 0 again), but every sweep cuts the same
    chunks from step 0, so it is the same computation as the local run: the same bits."""
    model, x = lstm_model(), inputs()
    local = jacstream.jacobian(model, x, tmp_path / "local.zarr", strategy="sensitivity",
                               **OPTS)
    ref = reference(model, x)
    np.testing.assert_allclose(full(local), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    dist = jacstream.jacobian(model, x, tmp_path / "dist.zarr", strategy="sensitivity",
                              client=client, **OPTS)
    assert dist.complete and dist.plan.strategy == "sensitivity"
    assert full(dist).tobytes() == full(local).tobytes(), "distributed != local (bitwise)"


def seq_static_model():
    """A sequence and a static vector (named inputs): the other input goes with each block."""
    import keras

    keras.utils.set_random_seed(5)
    seq, static = keras.Input((None, F_IN), name="seq"), keras.Input((3,), name="static")
    h = keras.layers.LSTM(6, return_sequences=True)(seq)
    h = keras.layers.Add()([h, keras.layers.RepeatVector(T)(keras.layers.Dense(6)(static))])
    return keras.Model({"seq": seq, "static": static}, keras.layers.Dense(1)(h))


def test_several_inputs_distributed_equals_local_bitwise(client, tmp_path):
    """Workers get the static vectors with the model and take each block's examples."""
    import tensorflow as tf

    model, x = seq_static_model(), inputs()
    s = np.random.default_rng(1).normal(size=(BATCH, 3)).astype("float32")
    given = {"seq": x, "static": s}
    local = jacstream.jacobian(model, given, tmp_path / "local.zarr", wrt="seq",
                               strategy="tile", **OPTS)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model({"seq": xt, "static": tf.constant(s)})
    assert_jacobian_close(full(local), tape.batch_jacobian(y, xt).numpy(), "local vs reference")
    dist = jacstream.jacobian(model, given, tmp_path / "dist.zarr", wrt="seq", strategy="tile",
                              client=client, **OPTS)
    assert dist.complete
    assert full(dist).tobytes() == full(local).tobytes(), "distributed != local (bitwise)"


# --------------------------------------------------------------------------- one task per slab
def carried_by_model(dask_worker=None):
    """On a worker: column steps its sensitivity functions carried so far, per model token."""
    from jacstream.run import worker

    return {token: m.fn.run_info()["sensitivity"]["column_steps_carried"]
            for token, m in worker._MODELS.items() if hasattr(m.fn, "run_info")}


def carried_since(client, before):
    """Column steps the workers' sensitivity functions carried since ``before``."""
    after = client.run(carried_by_model)
    return sum(n - before.get(addr, {}).get(token, 0)
               for addr, counts in after.items() for token, n in counts.items())


def jacstream_keys(task_stream, kind):
    keys = [ts["key"] for ts in task_stream.data]
    return sorted(k for k in keys if isinstance(k, str) and k.startswith(f"jacstream-{kind}-"))


def done_indices(path):
    return {int(n[:-5]) for n in os.listdir(done_dir(path)) if n.endswith(".done")}


@pytest.fixture(scope="module")
def sensitivity_local(tmp_path_factory):
    """A local sensitivity run of 20 blocks (2 slabs of examples x 10 blocks of steps)."""
    model, x = lstm_model(), inputs(3)
    res = jacstream.jacobian(model, x, tmp_path_factory.mktemp("sens") / "j.zarr",
                             strategy="sensitivity", **OPTS)
    assert res.complete and res.n_blocks == N_BLOCKS
    assert_jacobian_close(full(res), reference(model, x), "local sensitivity vs batch_jacobian")
    return model, x, res


def test_sensitivity_one_task_per_slab_sweeps_each_slab_once(client, tmp_path,
                                                             sensitivity_local):
    """A slab's blocks go to one task that sweeps once: the same bits as the local run, and
    the workers carry the columns of two sweeps (one per slab), as the local run's blocks do.
    """
    from distributed import get_task_stream

    model, x, local = sensitivity_local
    # The local record counts the validation's sweeps too (short prefixes); a second
    # local run on a plan of one slab tells them apart: its blocks sweep once.
    one = jacstream.jacobian(model, x, tmp_path / "one.zarr", strategy="sensitivity",
                             block_size=4, examples_per_block=BATCH, progress=False)
    two_sweeps = local.attrs["runs"][-1]["sensitivity"]["column_steps_carried"]
    one_sweep = one.attrs["runs"][-1]["sensitivity"]["column_steps_carried"]
    per_slab = two_sweeps - one_sweep
    assert per_slab > 0
    before = client.run(carried_by_model)
    seen = []
    with get_task_stream(client=client) as ts:
        dist = jacstream.jacobian(model, x, tmp_path / "dist.zarr", strategy="sensitivity",
                                  client=client, on_block=seen.append, **OPTS)
    assert dist.complete and dist.plan.strategy == "sensitivity"
    assert np.array_equal(full(dist), full(local)), "distributed != local (bitwise)"
    assert sorted(b.index for b in seen) == list(range(N_BLOCKS))   # each block once
    assert len(jacstream_keys(ts, "slab")) == 2 and not jacstream_keys(ts, "block")
    assert carried_since(client, before) == 2 * per_slab
    run = dist.attrs["runs"][-1]
    assert run["blocks_computed"] == N_BLOCKS
    assert sum(w["blocks"] for w in run["workers"].values()) == N_BLOCKS


def test_sensitivity_resume_on_dask_computes_only_missing_blocks(client, tmp_path,
                                                                 sensitivity_local):
    """A finished store with some markers removed (blocks of both slabs, not the first ones
    of a slab): the dask run computes exactly those, sweeping each slab once."""
    model, x, local = sensitivity_local
    path = tmp_path / "j.zarr"
    res = jacstream.jacobian(model, x, path, strategy="sensitivity", **OPTS)
    assert res.complete
    missing = [3, 4, 8, 15]       # slab 0 holds blocks 0-9, slab 1 blocks 10-19
    for i in missing:
        os.remove(done_dir(path) / f"{i:08d}.done")
    assert done_indices(path) == set(range(N_BLOCKS)) - set(missing)
    seen = []
    dist = jacstream.jacobian(model, x, path, strategy="sensitivity", client=client,
                              on_block=seen.append, **OPTS)
    assert dist.complete and done_indices(path) == set(range(N_BLOCKS))
    assert sorted(b.index for b in seen) == missing
    run = dist.attrs["runs"][-1]
    assert run["executor"] == "dask"
    assert run["blocks_computed"] == len(missing)
    assert run["blocks_skipped"] == N_BLOCKS - len(missing)
    assert sorted(dist.stats["computed_blocks"]) == missing
    # The same bits: every sweep cuts the same chunks from step 0.
    assert np.array_equal(full(dist), full(local))


def test_slab_task_progress_follows_markers(client, tmp_path, sensitivity_local):
    """One slab task of 10 blocks: blocks are announced as their markers appear, while the
    task still runs, not all at once when it returns."""
    model, x, local = sensitivity_local
    while_running = []

    def on_block(block):
        while_running.append(any(client.run(_executing).values()))

    client.run(slow_markers, 0.3)     # the task then runs for 3 s or more
    try:
        dist = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="sensitivity",
                                  client=client, on_block=on_block, block_size=4,
                                  examples_per_block=BATCH, progress=False)
    finally:
        client.run(slow_markers, 0)
    assert dist.complete and dist.n_blocks == 10
    assert len(while_running) == 10
    assert while_running[0], "the first block was announced only when its task returned"
    assert_jacobian_close(full(dist), full(local), "one slab of 4 vs two of 2 examples")


def test_non_sweeping_strategy_keeps_one_task_per_block(client, tmp_path, lstm_local):
    from distributed import get_task_stream

    model, x, expected = lstm_local
    with get_task_stream(client=client) as ts:
        dist = jacstream.jacobian(model, x, tmp_path / "j.zarr", strategy="pfor",
                                  client=client, **OPTS)
    assert dist.complete
    blocks = jacstream_keys(ts, "block")
    assert len(blocks) == N_BLOCKS and not jacstream_keys(ts, "slab")
    assert sorted(int(k.split("-")[2]) for k in blocks) == list(range(N_BLOCKS))
    assert np.array_equal(full(dist), expected)


def test_killed_slab_task_keeps_its_blocks_and_the_retry_skips_them(client, tmp_path):
    """Kills the worker running a slab's task midway: the blocks it finished stay done, the
    task runs again elsewhere and computes only the rest, and the result is the local one."""
    model, x = lstm_model(), inputs(4)
    one_slab = {**OPTS, "examples_per_block": BATCH}    # one task of 10 blocks
    local = jacstream.jacobian(model, x, tmp_path / "local.zarr", strategy="sensitivity",
                               **one_slab)
    path = tmp_path / "j.zarr"
    client.run(slow_markers, 0.3)
    th, out = in_thread(lambda: jacstream.jacobian(model, x, path, client=client,
                                                   strategy="sensitivity", **one_slab))
    end = time.monotonic() + 60
    busy = []
    while time.monotonic() < end and th.is_alive() and not busy:
        if n_markers(path) >= 3:
            busy = [a for a, n in client.run(_executing).items() if n]
        time.sleep(0.01)
    assert busy, "no worker was running the slab's task"
    done_at_kill = n_markers(path)
    res = finish_after_kill(client, th, out, client.run(os.getpid, workers=busy)[busy[0]])
    assert 3 <= done_at_kill < 10, done_at_kill
    assert res.complete and n_markers(path) == 10
    run = res.attrs["runs"][-1]
    # The retry found the killed attempt's blocks marked and skipped them.
    assert run["blocks_skipped"] >= done_at_kill
    assert run["blocks_computed"] + run["blocks_skipped"] == 10
    assert np.array_equal(full(res), full(local))
