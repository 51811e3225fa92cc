"""Progress: a line per phase before the first block, then a bar weighted by each block's work.

Progress shows on a terminal only, so these tests give the run a real one: a
pseudo-terminal (``pty``) as stderr, read back from its other end.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import numpy as np
import pytest

import jacstream
from jacstream.planning import make_plan
from jacstream.planning.choice import block_work
from jacstream.run.progress import BlockBar

ROOT = Path(__file__).resolve().parents[1]


class Terminal:
    """A pseudo-terminal 120 columns wide; ``text()`` is all that was written to it."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:   # EIO: every writer has closed its end
                return
            if not data:
                return
            self.chunks.append(data)

    def text(self) -> str:
        self.reader.join(timeout=30)
        raw = b"".join(self.chunks).decode(errors="replace")
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw).replace("\r", "\n")


def _in_order(text: str, *parts: str) -> list[int]:
    at, where = 0, []
    for part in parts:
        i = text.find(part, at)
        assert i >= 0, f"{part!r} not after position {at} in:\n{text}"
        where.append(i)
        at = i + len(part)
    return where


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import keras

    d = tmp_path_factory.mktemp("progress")
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((None, 1)), keras.layers.LSTM(4, return_sequences=True),
                              keras.layers.Dense(1)])
    model.save(d / "model.keras")
    x = np.random.default_rng(4).normal(size=(2, 12, 1)).astype("float32")
    np.save(d / "inputs.npy", x)
    return {"model": model, "x": x, "model_file": d / "model.keras", "npy": d / "inputs.npy"}


def test_cli_says_each_phase_before_the_first_block(files, tmp_path):
    term = Terminal()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-m", "jacstream", "compute", str(files["model_file"]),
                          str(files["npy"]), str(tmp_path / "j.zarr"), "--strategy", "tile",
                          "--examples-per-block", "1"],
                         env=env, stdout=subprocess.PIPE, stderr=term.slave, text=True)
    os.close(term.slave)
    out, _ = p.communicate(timeout=180)
    err = term.text()
    assert p.returncode == 0, err
    n = jacstream.open(tmp_path / "j.zarr").plan.n_blocks
    where = _in_order(err, "jacstream: loading the model", "jacstream: checking the model",
                      "jacstream: tracing the tile block function",
                      "jacstream: measuring the memory of tile blocks",
                      f"jacstream: computing {n} of {n} blocks", "jacobian: ",
                      "100%", f"{n}/{n} blocks")
    assert "%|" not in err[:where[5]]   # no bar before the phases are done
    assert f"{n} / {n} done" in out


def test_api_progress_says_the_phases_then_the_bar(files, tmp_path):
    term = Terminal()
    stream = os.fdopen(term.slave, "w", buffering=1)
    old, sys.stderr = sys.stderr, stream
    try:
        J = jacstream.jacobian(files["model"], files["x"], tmp_path / "j.zarr", block_size=4)
        quiet = jacstream.jacobian(files["model"], files["x"], tmp_path / "q.zarr",
                                   block_size=4, progress=False, strategy="tile")
    finally:
        sys.stderr = old
        stream.close()
    err = term.text()
    assert J.plan.n_blocks == quiet.plan.n_blocks == 3
    # strategy="auto" traces and times candidates: each says so, before the first block.
    where = _in_order(err, "jacstream: checking the model", "jacstream: tracing the ",
                      "jacstream: timing a trial block of ", "jacstream: computing 3 of 3 blocks",
                      "jacobian: ", "100%", "3/3 blocks")
    assert "%|" not in err[:where[4]]
    # progress=False: not a line (the second call traced tile, and said nothing)
    assert err.count("jacstream: checking the model") == 1


def test_bar_advances_by_each_blocks_work_not_by_blocks():
    # A causal plan: block k needs the input steps [0, 4 (k + 1)), so it has k + 1 times
    # the work of the first; a bar counting blocks would say 1/3 done after the first.
    plan = make_plan((2, 12, 1), (2, 12, 1), block_size=4, causal=True, strategy="tile")
    assert [b.in_len for b in plan.blocks] == [4, 8, 12]
    bar = BlockBar(plan, set(), "jacobian", progress=False)
    assert bar.total == sum(block_work(plan, b) for b in plan.blocks) == 2 * 4 * (4 + 8 + 12)
    fractions = []
    for b in plan.blocks:
        bar.advance(b)
        fractions.append(bar.done_work / bar.total)
    assert fractions == [1 / 6, 3 / 6, 1.0]
    assert bar.blocks_done == 3
    bar.close()
    # A resumed run starts with the stored blocks' work; a trial block computed before the
    # bar counts from the start too (its time is spent), and adds nothing when stored.
    bar = BlockBar(plan, {0}, "jacobian", progress=False, precomputed={2})
    assert (bar.done_work, bar.blocks_done) == (2 * 4 * (4 + 12), 1)
    bar.advance(plan.block(2))
    assert bar.done_work == 2 * 4 * (4 + 12)
    bar.advance(plan.block(1))
    assert (bar.done_work, bar.blocks_done) == (bar.total, 3)
    bar.close()
