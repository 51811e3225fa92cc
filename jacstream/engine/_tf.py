"""The one import of TensorFlow and Keras (and the one place their C++ logging is quieted).

Every engine module imports them from here.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

__all__ = ["keras", "tf"]
