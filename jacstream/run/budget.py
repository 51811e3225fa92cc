"""The default memory budget of a local run."""

from __future__ import annotations

__all__ = ["default_memory_budget"]


def default_memory_budget() -> int:
    """2 GiB, or a quarter of the memory available now if that is less."""
    import psutil

    return int(min(2 * 2**30, psutil.virtual_memory().available // 4))
