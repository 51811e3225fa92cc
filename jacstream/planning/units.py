"""Units: sizes in bytes (one table for parsing and printing) and the storage dtypes.

No TensorFlow here.
"""

from __future__ import annotations

import math
import re

from ..errors import BudgetError

__all__ = ["DTYPES", "UNITS", "format_bytes", "is_float", "itemsize", "parse_memory"]

# Storage dtypes: the computation is float32, each value is rounded once when stored.
DTYPES = ("float32", "float16", "bfloat16", "float64")
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

_BINARY = ("B", "KiB", "MiB", "GiB", "TiB")   # powers of 1024: what format_bytes prints
_DECIMAL = ("B", "KB", "MB", "GB", "TB")      # powers of 1000
# Every unit parse_memory accepts (lower case): "k", "m"... are binary, as in "2g".
UNITS = {"": 1,
         **{u.lower(): 1024**i for i, u in enumerate(_BINARY)},
         **{u.lower(): 1000**i for i, u in enumerate(_DECIMAL)},
         **{u[0].lower(): 1024**i for i, u in enumerate(_BINARY) if i}}


def itemsize(dtype: str) -> int:
    """Bytes per stored value of a storage dtype (``"float16"``: 2)."""
    return _ITEMSIZE[dtype]


def is_float(dtype: object) -> bool:
    """Whether ``dtype`` (a NumPy dtype or its name) is floating point, bfloat16 included."""
    import numpy as np

    if str(dtype).startswith("bfloat"):
        return True
    try:
        return np.dtype(dtype).kind == "f"  # type: ignore[call-overload]
    except TypeError:
        return False


def parse_memory(value: int | float | str | None, *, name: str = "memory_budget") -> int | None:
    """Turn ``"2GiB"``, ``"512 MB"`` or a number of bytes into bytes.

    Examples
    --------
    >>> parse_memory("1.5GiB")
    1610612736
    >>> parse_memory(4096)
    4096
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise BudgetError(f"{name} must be bytes (int) or a string like '2GiB', got {value!r}.")
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in UNITS:
            raise BudgetError(
                f"{name}={value!r} is not a size: use bytes (e.g. 2147483648) or a number "
                f"with a unit, e.g. '2GiB', '512MiB', '1.5GB'.")
        n = float(m.group(1)) * UNITS[m.group(2).lower()]
    else:
        raise BudgetError(f"{name} must be bytes (int) or a string like '2GiB', "
                          f"got {type(value).__name__}.")
    if not math.isfinite(n) or n <= 0:
        raise BudgetError(f"{name} must be positive, got {value!r}.")
    return int(n)


def format_bytes(n: float | None) -> str:
    """Human-readable binary size, e.g. ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    if n is None:
        return "-"
    i = 0
    while abs(n) >= 1024 and i < len(_BINARY) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.2f} {_BINARY[i]}"
