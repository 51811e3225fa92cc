"""Storage dtypes: float32/float64, and the reduced-precision float16 and bfloat16.

zarr-python 3.1 stores float16 natively but knows no bfloat16. NumPy has none
either; ``ml_dtypes`` (installed with TensorFlow) provides it, and this module
registers it with zarr under the zarr v3 extension name ``"bfloat16"``: two
bytes per value, little-endian, the top half of a float32. A store written
this way is read back by any process that imports jacstream (which registers
the type when it opens a store). No TensorFlow here.

Rounding to a reduced dtype happens once, when a block is written
(round-to-nearest-even); the relative error of each stored value is at most
``2**-11`` (float16, about 4.9e-4) or ``2**-8`` (bfloat16, about 3.9e-3) for
values in the normal range. float16 also has a narrow range: values under
about 6e-8 in magnitude become 0 (and under 6.1e-5 lose relative precision),
and values over 65504 would become infinite, which is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import InputError, NonFiniteError
from ..planning.units import DTYPES as STORAGE_DTYPES

__all__ = ["STORAGE_DTYPES", "cast", "native_dtype", "register_bfloat16"]

# Largest relative rounding error of a value in each dtype's normal range.
RELATIVE_ERROR = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11,
                  "bfloat16": 2.0**-8}
FLOAT16_MAX = 65504.0

_registered = False


def register_bfloat16() -> bool:
    """Teach zarr the ``bfloat16`` data type (once); False if ml_dtypes is missing."""
    global _registered
    if _registered:
        return True
    try:
        import ml_dtypes
        from zarr.core.dtype import data_type_registry
        from zarr.core.dtype.npy.float import BaseFloat
    except ImportError:
        return False

    @dataclass(frozen=True, kw_only=True)
    class BFloat16(BaseFloat):  # type: ignore[type-arg]
        """zarr data type for ``ml_dtypes.bfloat16`` (zarr v3 name ``"bfloat16"``)."""

        dtype_cls = type(np.dtype(ml_dtypes.bfloat16))
        _zarr_v3_name = "bfloat16"
        _zarr_v2_names: ClassVar[tuple[str, ...]] = ()

        @property
        def item_size(self) -> int:
            return 2

    if "bfloat16" not in data_type_registry.contents:
        data_type_registry.register("bfloat16", BFloat16)
    _registered = True
    return True


def native_dtype(name: str) -> Any:
    """The NumPy dtype that stores ``name`` (``ml_dtypes.bfloat16`` for bfloat16)."""
    if name not in STORAGE_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(map(repr, STORAGE_DTYPES))}; "
                         f"got {name!r}.")
    if name == "bfloat16":
        if not register_bfloat16():
            raise InputError("dtype='bfloat16' needs the ml_dtypes package (installed with "
                             "TensorFlow): pip install ml_dtypes, or use dtype='float16'.")
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def cast(data: np.ndarray, name: str) -> np.ndarray:
    """Round a block to the storage dtype; refuse values float16 would turn into Inf."""
    target = native_dtype(name)
    if data.dtype == target:
        return data
    if name == "float16":
        finite = np.isfinite(data)
        big = np.abs(np.where(finite, data, 0)).max(initial=0.0)
        if big > FLOAT16_MAX:
            raise NonFiniteError(
                f"a Jacobian entry of magnitude {float(big):.3g} does not fit in float16 (largest "
                f"{FLOAT16_MAX:g}): it would be stored as Inf. Use dtype='bfloat16' (float32's "
                "range, fewer digits) or 'float32'.")
    return data.astype(target)
