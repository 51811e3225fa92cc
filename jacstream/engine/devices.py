"""Devices: names TensorFlow knows, and the memory a probe can measure on each."""

from __future__ import annotations

from typing import Any

from .._memory import PeakTracker
from ..errors import DeviceError
from ._tf import tf

__all__ = ["DevicePeak", "peak_tracker", "resolve_device"]


def resolve_device(device: str | None) -> str:
    """Turn ``None``, ``"cpu"``, ``"gpu"``, ``"GPU:1"``... into a TF device name that exists."""
    logical = [d.name for d in tf.config.list_logical_devices()]
    if device is None:
        gpus = [d for d in logical if ":GPU:" in d]
        return gpus[0] if gpus else next(d for d in logical if ":CPU:" in d)
    if not isinstance(device, str):
        raise DeviceError(f"device must be a string such as 'cpu' or 'gpu:0', got {device!r}.")
    want = device.strip().upper().lstrip("/")
    if "DEVICE:" in want:  # "/device:CPU:0", "/job:localhost/replica:0/task:0/device:CPU:0"
        want = want.rsplit("DEVICE:", 1)[1]
    if ":" not in want:
        want += ":0"
    for name in logical:
        if name.upper().endswith("DEVICE:" + want) or name.upper().endswith(want):
            return name
    raise DeviceError(f"device={device!r} does not exist here; TensorFlow sees "
                      f"{[n.split('device:')[-1] for n in logical]}. Use one of those, or None "
                      "(a GPU if there is one, else the CPU).")


class DevicePeak:
    """Peak memory of a GPU inside a ``with`` block, above its start (TF's allocator stats)."""

    def __init__(self, device: str) -> None:
        self.device = device.split("device:")[-1]
        self.start = self.peak = 0

    @property
    def increase(self) -> int:
        return max(0, self.peak - self.start)

    def __enter__(self) -> DevicePeak:
        tf.config.experimental.reset_memory_stats(self.device)
        self.start = int(tf.config.experimental.get_memory_info(self.device)["current"])
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = int(tf.config.experimental.get_memory_info(self.device)["peak"])


def peak_tracker(device: str) -> Any:
    """Memory tracker for a probe: device memory on a GPU, resident memory on the CPU."""
    return DevicePeak(device) if ":GPU:" in device else PeakTracker()
