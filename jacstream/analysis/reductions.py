"""Reductions by name: what ``reduce=`` and :func:`jacstream.analysis.reduction` accept.

No TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError, check_choice
from .accumulators import FeatureImportance, LagProfile, Map, TopK, WindowSum
from .source import Accumulator, Layout

__all__ = ["REDUCTIONS", "Reduction", "as_reduction"]


def _build_window_sum(layout: Layout, **kw: Any) -> Accumulator:
    return WindowSum(layout, **kw)


def _build_influence_map(layout: Layout, reduce: str = "sum", absolute: bool = True,
                         example: int | None = None, bins: Any = None) -> Accumulator:
    check_choice("reduce", reduce, ("sum", "max"))
    return Map(layout, reduce=reduce, absolute=absolute, example=example, bins=bins)


def _build_lag_profile(layout: Layout, absolute: bool = True) -> Accumulator:
    return LagProfile(layout, absolute=absolute)


def _build_top_k(layout: Layout, k: int = 5, example: int | None = None) -> Accumulator:
    return TopK(layout, k=k, example=example)


def _build_feature_importance(layout: Layout, absolute: bool = True,
                              example: int | None = None) -> Accumulator:
    return FeatureImportance(layout, absolute=absolute, example=example)


REDUCTIONS: dict[str, tuple[Callable[..., Accumulator], tuple[str, ...]]] = {
    "window_sum": (_build_window_sum, ("in_steps", "out_steps", "absolute", "example")),
    "influence_map": (_build_influence_map, ("reduce", "absolute", "example", "bins")),
    "lag_profile": (_build_lag_profile, ("absolute",)),
    "top_k": (_build_top_k, ("k", "example")),
    "feature_importance": (_build_feature_importance, ("absolute", "example")),
}


@dataclass(frozen=True)
class Reduction:
    """A named reduction and its arguments, e.g. ``Reduction("top_k", {"k": 3})``.

    Made by :func:`jacstream.analysis.reduction`; passed as
    ``jacstream.jacobian(..., reduce=...)``.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, layout: Layout) -> Accumulator:
        return REDUCTIONS[self.name][0](layout, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (slices become ``{"slice": [start, stop, step]}``)."""
        def enc(v: Any) -> Any:
            if isinstance(v, slice):
                return {"slice": [v.start, v.stop, v.step]}
            if isinstance(v, tuple):
                return [enc(x) for x in v]
            if isinstance(v, np.generic):
                return v.item()
            return v
        return {"name": self.name, "kwargs": {k: enc(v) for k, v in sorted(self.kwargs.items())}}


def as_reduction(spec: Any) -> Reduction:
    """Check a ``reduce=`` argument: a name, a :class:`Reduction`, or ``(name, kwargs)``."""
    names = ", ".join(map(repr, REDUCTIONS))
    if isinstance(spec, str):
        spec = Reduction(spec)
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        spec = Reduction(spec[0], dict(spec[1]))
    elif not isinstance(spec, Reduction):
        raise InputError(f"reduce must be the name of a reduction ({names}) or "
                         f"jacstream.analysis.reduction(name, **kwargs); got {spec!r}.")
    if spec.name not in REDUCTIONS:
        raise InputError(f"reduce={spec.name!r} is not a reduction; choose one of {names}.")
    allowed = REDUCTIONS[spec.name][1]
    unknown = sorted(set(spec.kwargs) - set(allowed))
    if unknown:
        raise InputError(f"the reduction {spec.name!r} takes no argument {unknown[0]!r}; its "
                         f"arguments are {', '.join(allowed)}.")
    return spec
