"""The demo (``jacstream demo``, ``make demo``): the question this project exists to answer.

Train the reference model of the project notes (``LSTM(32)`` then
``TimeDistributed(Dense(1))``) on random sequences, as the person we build for
did, then compute its per-example Jacobian for a batch of long sequences
(T=2000, where eager ``tape.batch_jacobian`` needs far more than 10 GiB) under
a 1 GiB memory budget, streamed into ``OUTPUT/jacobian.zarr``, and summarise it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._memory import current_rss, peak_rss
from .errors import InputError
from .planning import format_bytes

__all__ = ["run_demo", "top_influences"]


def top_influences(J: Any, step: int, k: int = 5) -> list[tuple[int, float]]:
    """The ``k`` input steps with the largest mean ``|J|`` (over examples) for one output step.

    Reads only the chunks of that output step: ``J[:, a]`` with ``a`` its
    position in ``J.out_steps``. Features are summed; steps of no influence are left out.
    """
    a = int(np.searchsorted(J.out_steps, step))
    if a >= len(J.out_steps) or J.out_steps[a] != step:
        raise InputError(f"output step {step} is not in the store")
    row = np.abs(np.asarray(J[:, a], dtype=np.float64))  # (batch, F_out, T_in, F_in)
    score = row.mean(axis=0).sum(axis=(0, 2))
    order = np.argsort(-score, kind="stable")[:k]
    return [(int(t), float(score[t])) for t in order if score[t] > 0]


class _PeakSampler:
    """Peak RSS above the start, sampled: the library resets the kernel's peak inside."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> _PeakSampler:
        self.start = self.peak = current_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        # The kernel's peak since its last reset is also a lower bound of the true peak.
        self.peak = max(self.peak, current_rss(), peak_rss())

    @property
    def increase(self) -> int:
        return max(0, self.peak - self.start)


def run_demo(output: str | os.PathLike[str] = "demo-output", *, steps: int = 2000,
             batch: int = 10, epochs: int = 3, train_examples: int = 64, train_steps: int = 100,
             memory_budget: str | int = "1GiB", seed: int = 0, progress: bool = True,
             echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train the reference model, stream its Jacobian into ``output/jacobian.zarr``, summarise.

    Parameters
    ----------
    output : str or path
        Directory for ``model.keras``, ``inputs.npy``, ``jacobian.zarr`` and plots.
    steps, batch : int
        Shape of the inputs whose Jacobian is computed: ``(batch, steps, 1)``.
    epochs, train_examples, train_steps : int
        Training on random data: ``train_examples`` sequences of ``train_steps``.
    memory_budget : str or int
        Passed to :func:`jacstream.jacobian`.
    seed : int
        Seed of the data and the weights.
    progress : bool
        Show the progress bar.
    echo : callable
        Where the summary lines go (``print`` by default).

    Returns
    -------
    dict
        The numbers printed: shape, seconds, peak memory, bytes, top influences.

    Examples
    --------
    >>> import tempfile
    >>> r = run_demo(tempfile.mkdtemp(), steps=30, batch=2, epochs=1,
    ...              progress=False, echo=lambda s: None)  # doctest: +SKIP
    >>> r["shape"]  # doctest: +SKIP
    (2, 30, 1, 30, 1)
    """
    import jacstream

    from .engine.reference import train_reference_model

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    t0 = time.perf_counter()
    x_train = rng.random((train_examples, train_steps, 1), dtype=np.float32)
    y_train = rng.random((train_examples, train_steps, 1), dtype=np.float32)
    model, loss = train_reference_model(x_train, y_train, epochs=epochs, seed=seed,
                                        save_to=out / "model.keras")
    x = rng.random((batch, steps, 1), dtype=np.float32)
    np.save(out / "inputs.npy", x)
    echo(f"trained the reference model (LSTM(32) -> TimeDistributed(Dense(1))) for {epochs} "
         f"epoch(s) on {train_examples} random sequences of {train_steps} steps: loss "
         f"{loss:.4f} ({time.perf_counter() - t0:.1f} s)")
    echo(f"computing the Jacobian of {batch} sequences of {steps} steps into "
         f"{str(out / 'jacobian.zarr')!r} with a memory budget of {memory_budget}...")

    t1 = time.perf_counter()
    with _PeakSampler() as mem:
        J = jacstream.jacobian(model, x, out / "jacobian.zarr", memory_budget=memory_budget,
                               overwrite=True, progress=progress)
    wall = time.perf_counter() - t1

    probe = sorted({max(0, min(steps - 1, s)) for s in (steps // 20, steps // 2, steps - 1)})
    tops = {s: top_influences(J, s) for s in probe}
    result = {"shape": J.shape, "seconds": wall, "peak_rss_increase": mem.increase,
              "nbytes_stored": J.nbytes_stored, "nbytes": J.nbytes, "blocks": J.n_blocks,
              "block_size": J.plan.block_size, "causal": J.causal, "top": tops,
              "loss": loss, "plots": []}

    echo("")
    echo(f"jacobian     {J.shape}  (example, out_step, out_feature, in_step, in_feature)")
    echo(f"wall time    {wall:.1f} s  ({J.n_blocks} blocks of {J.plan.block_size} output "
         f"steps, causal truncation {'on' if J.causal else 'off'})")
    echo(f"peak memory  {format_bytes(mem.increase)} above the start of the call (budget "
         f"{memory_budget})")
    echo(f"on disk      {format_bytes(J.nbytes_stored)} of {format_bytes(J.nbytes)} dense "
         f"({J.nbytes_stored / max(1, J.nbytes):.1%})")
    echo("most influential input steps (mean |dy[t]/dx[s]| over examples):")
    for s, top in tops.items():
        echo(f"  output step {s:>5}: " + ", ".join(f"{t} ({v:.2g})" for t, v in top))

    os.environ.setdefault("MPLBACKEND", "Agg")  # files only, never a window
    from .analysis import plot

    plot.heatmap(J, example=0, out_feature=0, in_feature=0, log=True, path=out / "heatmap.png")
    plot.lag_profile(J, path=out / "lag_profile.png")
    result["plots"] = [out / "heatmap.png", out / "lag_profile.png"]
    echo(f"plots        {out / 'heatmap.png'}, {out / 'lag_profile.png'}")
    echo("")
    echo("next: jacstream info " + str(out / "jacobian.zarr"))
    return result
