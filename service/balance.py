"""How many requests each HTTP worker of this server has in flight, shared between the workers.

BentoML's HTTP workers accept from one listening socket, and asyncio accepts every pending connection in one go, so
the first worker to wake can take all of a burst's keep-alive connections and keep them for good (measured: 16 of
16 locust connections on one of two workers; ResNet50 served at 0.47x the in-process pipeline). The admission
middleware (service/middleware.py) uses these counts to hand a connection back (``Connection: close``) when its
worker is busier than another: the client reconnects and the least busy worker has a chance to take it. Only the
busier side ever closes, so the connections drift towards balance instead of wandering.

The counts live in a 4-byte slot per worker of a small file in /dev/shm named after the arbiter (the workers'
common parent process), mapped into each worker's memory.
"""

from __future__ import annotations

import atexit
import mmap
import os
import struct
import tempfile
from pathlib import Path

SLOT = struct.Struct("i")
PREFIX = "transferkit-inflight-"


def _directory() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class WorkerLoads:
    """This worker's slot (written) and the other workers' slots (read) of the server's shared counts."""

    def __init__(self, workers: int, index: int, key: str | None = None):
        self.workers, self.index = workers, index
        directory = _directory()
        _remove_stale(directory)
        self.path = directory / f"{PREFIX}{key or os.getppid()}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SLOT.size * workers:
                os.ftruncate(fd, SLOT.size * workers)
            self._map = mmap.mmap(fd, SLOT.size * workers)
        finally:
            os.close(fd)
        atexit.register(self._remove)

    def set(self, in_flight: int) -> None:
        SLOT.pack_into(self._map, SLOT.size * self.index, in_flight)

    def least_other(self) -> int:
        """The smallest in-flight count among the other workers."""
        counts = [SLOT.unpack_from(self._map, SLOT.size * i)[0] for i in range(self.workers) if i != self.index]
        return min(counts) if counts else 0

    def _remove(self) -> None:
        # A worker restarted after this sees a fresh file (zeros): it may shed a few connections too many, no harm.
        try:
            self.path.unlink()
        except OSError:
            pass


def _remove_stale(directory: Path) -> None:
    """Remove the files of servers whose arbiter is gone: workers stopped by a signal skip their atexit cleanup."""
    for path in directory.glob(f"{PREFIX}*"):
        pid = path.name[len(PREFIX):]
        if not pid.isdigit():
            continue  # a test's key, not a process id
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                path.unlink()
            except OSError:
                pass
        except OSError:
            pass  # alive, owned by someone else
