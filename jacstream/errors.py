"""The exceptions jacstream raises.

Every error is a :class:`JacstreamError`; each subclass also inherits the
builtin a caller would catch for the same problem (``ValueError``,
``FileExistsError``, ``OSError``...), as zarr's ``errors.py`` does. Messages
name the argument, what was expected, what was received and what to do.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BudgetError",
    "ClusterError",
    "DeviceError",
    "IncompleteStoreWarning",
    "InputError",
    "JacstreamError",
    "ModelError",
    "NonFiniteError",
    "NotAStoreError",
    "ReadOnlyStoreError",
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreWriteError",
]
# Also here, for jacstream's own modules: StrategyUnavailable (a ModelError that
# strategy="auto" catches), and the message helpers first_line and check_choice.


class JacstreamError(Exception):
    """Base class of every error raised by jacstream."""

    # Raised inside a function that tf.function is tracing, an exception is
    # re-raised by AutoGraph as a StagingError unless it carries this flag; with
    # it, the caller gets our error and its message unchanged.
    ag_pass_through = True


class InputError(JacstreamError, ValueError):
    """An argument (inputs, out_steps, block_size...) is not what was expected."""


class ModelError(JacstreamError, ValueError):
    """The model cannot be differentiated the way jacstream needs.

    Wrong output shape, examples that interact across the batch, outputs that
    do not depend differentiably on the inputs.
    """


class StrategyUnavailable(ModelError):
    """A strategy cannot differentiate this model (e.g. forward mode through an op without
    a forward or second derivative); ``strategy="auto"`` then leaves it out."""


class BudgetError(JacstreamError, ValueError):
    """The memory budget is unparseable or too small for even one output step."""


class DeviceError(JacstreamError, ValueError):
    """The requested device does not exist or cannot be used."""


class NonFiniteError(JacstreamError, FloatingPointError):
    """A block of the Jacobian holds NaN or Inf values."""


class StoreError(JacstreamError, OSError):
    """A problem with the zarr store on disk."""


class NotAStoreError(StoreError, FileNotFoundError):
    """The path is missing or is not a jacstream store."""


class StoreMismatchError(StoreError, FileExistsError):
    """The store exists but was made for another job."""


class StoreLockedError(StoreError, BlockingIOError):
    """Another process is writing the store (it holds the store's writer lock)."""


class ReadOnlyStoreError(StoreError, PermissionError):
    """The store, or the directory it should be created in, cannot be written."""


class StoreWriteError(StoreError):
    """Writing a block failed (disk full, permissions...); finished blocks are intact."""


class IncompleteStoreWarning(UserWarning):
    """The opened store does not hold every block yet (the run was interrupted)."""


class ClusterError(JacstreamError, ConnectionError):
    """The dask cluster cannot be reached or has no workers."""


def first_line(e: BaseException) -> str:
    """The line of an error message (TensorFlow's and Keras' wrapped ones too) that says
    what went wrong: colour codes, traceback lines and Keras' "Arguments received" dropped."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    keep = [line for line in (ln.strip() for ln in text.splitlines()) if line and not
            line.startswith(("in user code", "File ", "\u2022", "Arguments received"))]
    # Keras wraps the cause: "XError: Exception encountered when calling L.call()." + cause
    for i, line in enumerate(keep):
        if "Exception encountered when calling" in line and i + 1 < len(keep):
            return f"{keep[i + 1]} (in {line.split('calling ')[-1].rstrip('.')})"[:300]
    return (keep[-1] if keep else type(e).__name__)[:300]


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise InputError unless ``value`` is one of ``choices`` (``True`` is not ``1``)."""
    if not any(value is c or (isinstance(c, str) and value == c) for c in choices):
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
