"""jacstream: memory-bounded streaming Jacobians of TensorFlow sequence models.

>>> import jacstream
>>> J = jacstream.jacobian(model, inputs, "jac.zarr")      # doctest: +SKIP
>>> J[0, 10]        # d y[0, 10, :] / d x[0, :, :], read from disk  # doctest: +SKIP
"""

from . import errors as errors
from ._api import jacobian as jacobian
from ._api import plan as plan
from ._version import __version__ as __version__
from .errors import JacstreamError as JacstreamError
from .planning import Block as Block
from .planning import Plan as Plan
from .store import Jacobian as Jacobian
from .store import open as open  # noqa: A004

__all__ = ["Block", "Jacobian", "JacstreamError", "Plan", "__version__", "analysis", "errors",
           "jacobian", "open", "plan", "plot"]

# analysis (dask, xarray) and plot (matplotlib) load on first use
_LAZY = {"analysis": ".analysis", "plot": ".analysis.plot"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return importlib.import_module(_LAZY[name], __name__)
    raise AttributeError(f"module 'jacstream' has no attribute {name!r}")
