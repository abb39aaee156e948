"""Small records the processes of one server share: a file in /dev/shm mapped into each process's memory.

One file per kind of record and server, named after the server's arbiter (the ``bentoml serve`` process, parent of
every worker): every worker maps the same file, a worker restarted by the arbiter maps it again and overwrites its
own record. The arbiter removes its files when it exits (:func:`remove_server_files`); files of an arbiter killed
outright are removed by the next server's start (:func:`remove_stale`).

Each record has one writer (its process); readers take the others' records as they are. What needs more than that (a
decision several processes must agree on) takes the file's lock (:meth:`SharedRecords.locked`).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

PREFIX = "transferkit-"
# Every kind of record a server writes: requests in flight and readiness per HTTP worker (service/balance.py), the
# models each model process holds (service/ledger.py).
KINDS = ("inflight", "ready", "ledger")


def directory() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def server_key() -> str:
    """The arbiter's process id (service/lifecycle.py exports it to every worker), else this process's parent."""
    from transferkit.service.lifecycle import ARBITER_PID_ENV

    return os.environ.get(ARBITER_PID_ENV) or str(os.getppid())


class SharedRecords:
    """``count`` fixed-size records of ``record`` layout; this process writes record ``index``."""

    def __init__(self, kind: str, record: struct.Struct, count: int, index: int, key: str | None = None):
        self.record, self.count, self.index = record, count, index
        remove_stale()
        self.path = directory() / f"{PREFIX}{kind}-{key or server_key()}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < record.size * count:
                os.ftruncate(fd, record.size * count)
            self._map = mmap.mmap(fd, record.size * count)
            self._lock_fd = os.dup(fd)
            # flock excludes other processes only: this process's threads share the descriptor, so they queue here.
            self._thread_lock = threading.Lock()
        finally:
            os.close(fd)

    def write(self, *values) -> None:
        self.record.pack_into(self._map, self.record.size * self.index, *values)

    def read(self, index: int) -> tuple:
        return self.record.unpack_from(self._map, self.record.size * index)

    def others(self) -> list[tuple]:
        return [self.read(i) for i in range(self.count) if i != self.index]

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The file's lock, for a decision that reads several records and writes one or more (held briefly)."""
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, owned by someone else
    return True


def _files() -> Iterator[tuple[Path, str]]:
    """Every server file here, with the key its name ends in."""
    for path in directory().glob(f"{PREFIX}*-*"):
        kind, _, key = path.name[len(PREFIX):].rpartition("-")
        if kind in KINDS:
            yield path, key


def remove_server_files(key: str) -> None:
    """Remove the files of the server named ``key`` (its arbiter's at exit: every worker has stopped by then)."""
    for path, found in _files():
        if found == key:
            with contextlib.suppress(OSError):
                path.unlink()


def remove_stale() -> None:
    """Remove the files of servers whose arbiter is gone (killed before it could remove them)."""
    for path, key in _files():
        if key.isdigit() and not alive(int(key)):  # a test's key is not a process id
            with contextlib.suppress(OSError):
                path.unlink()
