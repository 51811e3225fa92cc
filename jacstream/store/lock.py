"""One writer per store: an advisory lock on a file inside the store.

A run that writes a store (a new one, a resumed one, or one it replaces) holds
an exclusive ``fcntl.flock`` on ``jacobian/jacstream.lock`` for as long as it
runs, and writes its pid, host and start time into the file. A second writer
is refused at once with :class:`~jacstream.errors.StoreLockedError` naming the
holder. The kernel drops the lock when the holder's process ends, however it
ends (SIGKILL too), so a lock left by a killed run never blocks the next one.
Reading a store never takes the lock. No TensorFlow here.

The file lives inside the array's directory, where zarr never lists (a file at
the group's top level would make zarr warn that it is not part of the
hierarchy).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import StoreLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: no lock (documented)
    fcntl = None  # type: ignore[assignment]

__all__ = ["WriterLock", "holder"]


class WriterLock:
    """The held lock of one store; :meth:`release` (or the process ending) drops it.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "jacstream.lock"
    >>> lock = WriterLock.acquire(f, "demo.zarr")
    >>> WriterLock.acquire(f, "demo.zarr")
    Traceback (most recent call last):
    ...
    jacstream.errors.StoreLockedError: the store 'demo.zarr' is being written by ...
    >>> lock.release()
    >>> WriterLock.acquire(f, "demo.zarr").release()
    """

    def __init__(self, file: Path, fd: int | None) -> None:
        self.file = file
        self._fd = fd

    @classmethod
    def acquire(cls, file: Path, store: str | os.PathLike[str]) -> WriterLock:
        """Take the lock in ``file`` (created if missing) or raise StoreLockedError."""
        if fcntl is None:  # pragma: no cover
            return cls(file, None)
        while True:
            fd = os.open(file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise _locked(store, holder(file)) from None
                # A filesystem without locks (some network or FUSE mounts): run unlocked.
                return cls(file, None)
            # The file may have been replaced between open and flock (a store moved aside
            # by overwrite=True): a lock on the old inode guards nothing, so try again.
            try:
                same = os.stat(file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_me()).encode())
        return cls(file, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent); the file stays, emptied."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor drops the flock

    def __del__(self) -> None:
        self.release()


def holder(file: Path) -> dict[str, Any]:
    """What the holder wrote into the lock file: pid, host, since, command ({} if unknown)."""
    try:
        info = json.loads(file.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)[:200]}


def _locked(store: str | os.PathLike[str], info: dict[str, Any]) -> StoreLockedError:
    who = (f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"
           if info else "a process that has not written its pid yet")
    cmd = f" ({info['command']})" if info.get("command") else ""
    return StoreLockedError(
        f"the store {str(store)!r} is being written by another process ({who}){cmd}. A store "
        "has one writer at a time: wait for that run to finish, or stop it (a stopped run "
        "resumes where it left off), then call again; or choose another path. Reading the "
        "store (jacstream.open, jacstream info) works meanwhile.")
