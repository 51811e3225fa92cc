"""The exceptions jacstream raises.

Every error is a :class:`JacstreamError`; each subclass also inherits the
builtin a caller would catch for the same problem (``ValueError``,
``FileExistsError``, ``OSError``...), as zarr's ``errors.py`` does. Messages
name the argument, what was expected, what was received and what to do.
"""

from __future__ import annotations

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
    "StoreMismatchError",
    "StoreWriteError",
]


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


class ReadOnlyStoreError(StoreError, PermissionError):
    """The store, or the directory it should be created in, cannot be written."""


class StoreWriteError(StoreError):
    """Writing a block failed (disk full, permissions...); finished blocks are intact."""


class IncompleteStoreWarning(UserWarning):
    """The opened store does not hold every block yet (the run was interrupted)."""


class ClusterError(JacstreamError, ConnectionError):
    """The dask cluster cannot be reached or has no workers."""
