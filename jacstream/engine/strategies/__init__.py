"""One module per strategy, each a :class:`~.base.BlockFunction` subclass.

Which strategies exist is the one table :data:`jacstream.planning.strategies.REGISTRY`;
:func:`function_class` imports the module a row names and returns the one
:class:`~.base.BlockFunction` subclass it defines.
"""

from __future__ import annotations

import importlib
import inspect

from ...errors import InputError
from ...planning.strategies import REGISTRY, STRATEGIES
from .base import BlockFunction, Computed, FunctionSpec

__all__ = ["BlockFunction", "Computed", "FunctionSpec", "function_class"]


def function_class(name: str) -> type[BlockFunction]:
    """The block-function class of strategy ``name`` (its module is imported once)."""
    if name not in REGISTRY:
        raise InputError(f"strategy must be one of {STRATEGIES}, got {name!r}.")
    module = importlib.import_module(REGISTRY[name].module)
    (cls,) = [c for _, c in inspect.getmembers(module, inspect.isclass)
              if issubclass(c, BlockFunction) and c is not BlockFunction
              and c.__module__ == module.__name__]
    if cls.axis != REGISTRY[name].axis:
        raise InputError(f"strategy {name!r}: its class runs along axis {cls.axis!r}, the "
                         f"registry says {REGISTRY[name].axis!r}.")
    return cls
