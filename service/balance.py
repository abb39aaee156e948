"""What each HTTP worker of this server shares with the others: its requests in flight and whether it is ready.

BentoML's HTTP workers accept from one listening socket, and asyncio accepts every pending connection in one go, so
the first worker to wake can take all of a burst's keep-alive connections and keep them for good (measured: 16 of
16 locust connections on one of two workers; ResNet50 served at 0.47x the in-process pipeline). The admission
middleware (service/middleware.py) uses the in-flight counts (:class:`WorkerLoads`) to hand a connection back
(``Connection: close``) when its worker is busier than another: the client reconnects and the least busy worker has
a chance to take it. Only the busier side ever closes, so the connections drift towards balance instead of wandering.

Readiness (:class:`WorkerReadiness`) is shared for the same reason: a probe is answered by whichever worker takes its
connection, so a server whose first worker was warm answered ``/readyz`` 200 while the second still warmed, and the
next request reaching the second got 503 (seen in CI). Each worker publishes its own readiness; the server is ready
when every worker is.

Both live in service/shared.py's files, one record per worker.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable

from transferkit.service.shared import SharedRecords, alive

logger = logging.getLogger(__name__)

IN_FLIGHT = struct.Struct("i")  # a worker's requests in flight
READY = struct.Struct("ii")  # a worker's process id, and 1 when it is ready
PUBLISH_EVERY_S = 0.25  # how late a worker's change of readiness reaches the others' probes, at most


class WorkerLoads(SharedRecords):
    """This worker's in-flight count (written) and the other workers' counts (read)."""

    def __init__(self, workers: int, index: int, key: str | None = None):
        super().__init__("inflight", IN_FLIGHT, workers, index, key)

    def set(self, in_flight: int) -> None:
        self.write(in_flight)

    def least_other(self) -> int:
        """The smallest in-flight count among the other workers."""
        counts = [count for count, in self.others()]
        return min(counts) if counts else 0


class WorkerReadiness(SharedRecords):
    """This worker's readiness (published by a thread every :data:`PUBLISH_EVERY_S`) and the others' (read).

    A worker that has not published yet, or whose process is gone (killed, restarting), counts as not ready."""

    def __init__(self, workers: int, index: int, ready_here: Callable[[], bool], key: str | None = None):
        super().__init__("ready", READY, workers, index, key)
        self._ready_here, self._failing, self._closed = ready_here, False, threading.Event()
        self.publish()  # a restarted worker's record says "not ready" from its first moment
        threading.Thread(target=self._publish_forever, name="transferkit-readiness", daemon=True).start()

    def publish(self) -> bool:
        try:
            ready, self._failing = bool(self._ready_here()), False
        except Exception:  # noqa: BLE001 - a readiness check that fails means "not ready", and must not stop
            if not self._failing:  # once, not four times a second
                logger.exception("transferkit: the readiness check failed")
            ready, self._failing = False, True
        self.write(os.getpid(), int(ready))
        return ready

    def others_ready(self) -> bool:
        return all(ready == 1 and alive(pid) for pid, ready in self.others())

    def close(self) -> None:
        """Stop publishing (a worker's thread runs for its life; tests end it)."""
        self._closed.set()

    def _publish_forever(self) -> None:
        while not self._closed.wait(PUBLISH_EVERY_S):
            self.publish()
