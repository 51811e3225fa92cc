"""The reference model of the project notes, for the demo: built and trained here."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._tf import keras

__all__ = ["build_reference_model", "train_reference_model"]


def build_reference_model(units: int = 32) -> Any:
    """``Input((None, 1)) -> LSTM(units, return_sequences=True) -> TimeDistributed(Dense(1))``."""
    inp = keras.Input(shape=(None, 1))
    h = keras.layers.LSTM(units, return_sequences=True)(inp)
    out = keras.layers.TimeDistributed(keras.layers.Dense(1))(h)
    return keras.Model(inp, out)


def train_reference_model(x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int,
                          save_to: str | os.PathLike[str]) -> tuple[Any, float]:
    """Build the reference model, fit it to ``(x, y)`` and save it; (model, last loss)."""
    keras.utils.set_random_seed(seed)
    model = build_reference_model()
    model.compile(optimizer="adam", loss="mse")
    loss = float("nan")
    if epochs:
        hist = model.fit(x, y, batch_size=10, epochs=epochs, verbose=0)
        loss = float(hist.history["loss"][-1])
    model.save(save_to)
    return model, loss
