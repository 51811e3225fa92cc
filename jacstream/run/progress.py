"""What a run shows while it works: a line per phase, then a bar weighted by each block's work.

Before the first block a call checks the model, traces one or more strategies'
block functions, measures their memory and times trial blocks: many seconds on
a long job. :func:`phase_lines` prints one line to stderr as each of those
phases begins (it listens to :mod:`jacstream.events`), so something says what
is happening from the first second. The blocks then advance a :class:`BlockBar`
in units of work (:func:`jacstream.planning.choice.block_work`), not blocks:
a causal run's blocks grow with their output steps, and a bar counting blocks
would promise the last, largest ones as fast as the first. Both show where a
bar can be watched (:func:`shown`: a terminal, or a notebook), never in a log
file or a pipe, where an error stays the one line it is.

Lines are written in the API's words (``call jacstream.jacobian() again``); a
front end with words of its own (the command line's flags) installs them with
:func:`worded`, so an interrupted ``jacstream compute`` says what to run instead.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Collection, Iterator
from typing import Any

from tqdm.auto import tqdm

from .. import events
from ..planning import Block, Plan
from ..planning.choice import block_work

__all__ = ["PHASE_TEXT", "BlockBar", "phase_lines", "say", "say_interrupted", "shown", "worded"]

# What each phase of :data:`jacstream.events.PHASES` is doing, for a person watching.
PHASE_TEXT = {
    "checks": "checking the model (eager passes: shapes, batch independence, gradients)",
    "detect_causal": "finding out whether the model is causal",
    "build": "tracing the {detail} block function",
    "probes": "measuring the memory of {detail} blocks",
    "trial": "timing a trial block of {detail}",
    "blocks": "computing {detail}",
}


_WORDING: list[Callable[[str], str]] = []


@contextlib.contextmanager
def worded(reword: Callable[[str], str]) -> Iterator[None]:
    """Inside ``with``: every line :func:`say` prints goes through ``reword`` first."""
    _WORDING.append(reword)
    try:
        yield
    finally:
        _WORDING.remove(reword)


def say(text: str, *, new_line: bool = False) -> None:
    """One line on stderr, ``jacstream: text`` (after a line break if ``new_line``: a bar
    may be on the current one)."""
    for reword in _WORDING[-1:]:
        text = reword(text)
    start = "\n" if new_line else ""
    print(f"{start}jacstream: {text}", file=sys.stderr, flush=True)


def say_interrupted(e: KeyboardInterrupt, text: str) -> None:
    """Say how an interrupted run stands (always: it says how to resume), once: ``e`` is
    marked, so a front end that catches it does not say "interrupted" again."""
    say(f"interrupted; {text}", new_line=True)
    e.jacstream_said = True  # type: ignore[attr-defined]


def shown(progress: bool) -> bool:
    """Whether progress is shown: asked for, and stderr a terminal or the run in a notebook
    (where tqdm draws a widget); the same rule as tqdm's own ``disable=None``."""
    notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)
    return progress and (notebook or bool(getattr(sys.stderr, "isatty", lambda: False)()))


def _on_start(phase: str, detail: str) -> None:
    text = PHASE_TEXT.get(phase, phase)
    say((text.format(detail=detail) if detail else text.replace(" {detail}", "")) + " ...")


@contextlib.contextmanager
def phase_lines(progress: bool) -> Iterator[None]:
    """Inside ``with`` (where progress is :func:`shown`): a line on stderr as each phase begins."""
    if not shown(progress):
        yield
        return
    with events.listen(on_start=_on_start):
        yield


class _Bar(tqdm):  # type: ignore[misc]
    """tqdm, with the blocks stored so far for its format (``{blocks}``)."""

    def __init__(self, *args: Any, blocks: str = "", **kwargs: Any) -> None:
        self.blocks = blocks   # before tqdm draws the bar for the first time
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        return {**super().format_dict, "blocks": self.blocks}


class BlockBar:
    """A progress bar over a plan's blocks that advances by each block's work.

    ``total`` is the work of every block of the plan, ``done_work`` the work done;
    blocks already in the store (``done``) and blocks the strategy trial
    computed (``precomputed``: their time is spent) count as done from the start,
    so the rate, and with it the time left, is that of the blocks computed now.
    The bar shows only on a terminal (or in a notebook), unless ``progress`` is False.
    """

    def __init__(self, plan: Plan, done: Collection[int], desc: str, progress: bool,
                 fn: Any = None, precomputed: Collection[int] = ()) -> None:
        self.work: Callable[[Block], float] = lambda b: block_work(plan, b, fn)
        self.n_blocks = plan.n_blocks
        self.early = set(precomputed) - set(done)
        counted = set(done) | self.early
        self.blocks_done = len(set(done))
        self.total = sum(self.work(b) for b in plan.blocks)
        initial = sum(self.work(b) for b in plan.blocks if b.index in counted)
        self.done_work = initial   # kept here too: a disabled tqdm counts nothing
        self.bar = _Bar(total=self.total, initial=initial, desc=desc,
                        disable=None if progress else True, dynamic_ncols=True,
                        file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|"
                        "{bar}| {blocks} [{elapsed}<{remaining}]", blocks=self._count_text())

    def _count_text(self) -> str:
        return f"{self.blocks_done}/{self.n_blocks} blocks"

    def advance(self, block: Block) -> None:
        """``block`` is stored: add its work (unless the trial's time already counted it)."""
        self.blocks_done += 1
        self.bar.blocks = self._count_text()
        if block.index in self.early:
            self.early.discard(block.index)
            self.bar.refresh()
        else:
            w = self.work(block)
            self.done_work += w
            self.bar.update(w)

    def close(self) -> None:
        self.bar.close()
