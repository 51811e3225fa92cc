"""Models in and out: fingerprints, Keras model files (the CLI) and bytes for dask workers."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np

from ..errors import ModelError, first_line
from ._tf import keras, tf
from .modelfile import MODEL_SUFFIXES, check_model_file
from .models import WithSide

__all__ = ["MODEL_SUFFIXES", "fingerprint_model", "load_model_file", "load_payload",
           "model_payload"]

def fingerprint_model(model: Any) -> str:
    """A hash of the model's class, configuration and weights (sha256 hex)."""
    h = hashlib.sha256()
    if isinstance(model, WithSide):   # the side inputs' values are part of the inputs' hash
        h.update(f"{fingerprint_model(model.model)} wrt={model.wrt!r} order={model.order!r} "
                 f"form={model.form}".encode())
        return h.hexdigest()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    if isinstance(model, keras.layers.Layer):
        try:
            h.update(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
        except Exception:
            pass
        for w in model.weights:
            h.update(w.path.encode() if hasattr(w, "path") else w.name.encode())
            h.update(np.ascontiguousarray(w.numpy()).tobytes())
    else:
        # A plain callable: its code and the weights of any Keras/TF variables it closes over.
        code = getattr(model, "__code__", None)
        if code is not None:
            h.update(code.co_code)
            h.update(repr(code.co_consts).encode())
        for cell in getattr(model, "__closure__", None) or ():
            try:
                obj = cell.cell_contents
            except ValueError:
                continue
            if isinstance(obj, keras.layers.Layer):
                h.update(fingerprint_model(obj).encode())
            elif isinstance(obj, (tf.Variable, np.ndarray, tf.Tensor)):
                h.update(np.asarray(obj).tobytes())
    return h.hexdigest()


def load_model_file(path: str | os.PathLike[str], *, unsafe: bool = False) -> Any:
    """Load a Keras model file, in Keras safe mode unless ``unsafe``.

    Safe mode refuses files that carry Python code (``Lambda`` layers hold
    pickled bytecode): loading one runs that code, so it takes an explicit
    ``unsafe=True`` (``--unsafe``) for a file you trust.
    """
    p = check_model_file(path)
    try:
        return keras.saving.load_model(p, compile=False, safe_mode=not unsafe)
    except Exception as e:
        if not unsafe and "safe_mode" in str(e):
            raise ModelError(f"the model file {str(p)!r} holds Python code (e.g. a Lambda "
                             "layer), which Keras will not load in safe mode. If you trust the "
                             "file, pass --unsafe.") from None
        raise ModelError(f"cannot load the model {str(p)!r}: {first_line(e)}") from e


def model_payload(model: Any) -> tuple[str, bytes]:
    """Serialise the original model for dask workers: ``.keras`` bytes, else cloudpickle.

    The kind is ``"keras"`` (loaded in Keras' safe mode) or, for a model with
    Lambda layers, ``"keras-lambda"``: safe mode refuses the Python code of a
    Lambda, and these bytes come from the caller's own in-memory model, not
    from an untrusted file, so the workers load them with ``safe_mode=False``.
    A model of several inputs (:class:`~jacstream.engine.models.WithSide`) is
    ``"with-side"``: its model's payload, ``wrt`` and the side inputs, pickled.
    """
    if isinstance(model, WithSide):
        import pickle

        return "with-side", pickle.dumps((model_payload(model.model), model.wrt, model.side,
                                          model.order, model.form))
    if isinstance(model, keras.Model):
        with tempfile.TemporaryDirectory(prefix="jacstream-") as d:
            path = os.path.join(d, "model.keras")
            try:
                model.save(path)
                with open(path, "rb") as f:
                    payload = f.read()
                config = json.dumps(model.get_config(), default=str)
            except Exception:
                pass  # e.g. a subclassed model without get_config: try cloudpickle
            else:
                lam = '"class_name": "Lambda"' in config
                return ("keras-lambda" if lam else "keras"), payload
    import cloudpickle

    try:
        return "pickle", cloudpickle.dumps(model)
    except Exception as e:
        raise ModelError(
            f"cannot send the model to the dask workers: it is neither savable as .keras nor "
            f"picklable ({type(e).__name__}: {e}). Give it a get_config() (Keras), or make it "
            "a function of module-level objects that cloudpickle can serialise.") from None


def load_payload(kind: str, payload: bytes) -> Any:
    """The model back from :func:`model_payload`'s bytes (on a dask worker)."""
    if kind == "with-side":
        import pickle

        # The client's own bytes (model_payload), as trusted as the cloudpickle kind.
        inner, wrt, side, order, form = pickle.loads(payload)  # noqa: S301
        return WithSide(load_payload(*inner), wrt, side, order, form)
    if kind == "pickle":
        import cloudpickle

        return cloudpickle.loads(payload)
    with tempfile.TemporaryDirectory(prefix="jacstream-") as d:
        path = os.path.join(d, "model.keras")
        with open(path, "wb") as f:
            f.write(payload)
        try:
            return keras.models.load_model(path, safe_mode=kind != "keras-lambda")
        except Exception as e:
            raise ModelError(
                f"the dask worker could not load the model from its .keras file "
                f"({type(e).__name__}: {e}). Custom layers must be importable on the workers "
                "and registered with keras.saving.register_keras_serializable().") from None
