"""A model file's path, checked before TensorFlow is imported (which takes seconds).

The command line checks the path first, so a wrong one is refused at once, with
one line, before anything says the model is loading.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

__all__ = ["MODEL_SUFFIXES", "check_model_file"]

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def check_model_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path if it names a Keras model file; else an InputError saying how to
    save one."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"model: no such file: {str(p)!r}. Pass a model saved with "
                         "model.save('model.keras').")
    if p.is_dir() or p.suffix.lower() not in MODEL_SUFFIXES:
        raise InputError(f"model: {str(p)!r} is not a Keras model file (.keras or .h5). Save "
                         "the model with model.save('model.keras'); a TensorFlow SavedModel "
                         "directory cannot be loaded by Keras 3.")
    return p
