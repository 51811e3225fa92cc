"""jacstream: memory-bounded streaming Jacobians of TensorFlow sequence models.

>>> import jacstream
>>> J = jacstream.jacobian(model, inputs, "jac.zarr")      # doctest: +SKIP
>>> J[0, 10]        # d y[0, 10, :] / d x[0, :, :], read from disk  # doctest: +SKIP
"""

from . import errors as errors
from ._api import jacobian as jacobian
from ._api import plan as plan
from ._plan import Block as Block
from ._plan import Plan as Plan
from ._result import Jacobian as Jacobian
from ._result import open as open  # noqa: A004
from ._version import __version__ as __version__
from .errors import JacstreamError as JacstreamError

__all__ = ["Block", "Jacobian", "JacstreamError", "Plan", "__version__", "analysis", "errors",
           "jacobian", "open", "plan", "plot"]


def __getattr__(name: str) -> object:
    # analysis (dask, xarray) and plot (matplotlib) load on first use
    if name in ("analysis", "plot"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'jacstream' has no attribute {name!r}")
