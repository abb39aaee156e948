"""Cross-request micro-batching inside one worker (the ``microbatch`` layout).

Requests are decoded on the worker's compute threads, then their pixels queue here. One model thread takes
everything queued when the model becomes free, up to ``max_batch`` images, and runs it as one call: no timer, no
waiting for a batch to fill (Triton's advice: start with no queue delay). Under light load a request runs alone at
batch 1; under load, batches grow by themselves while the previous call runs. A failing call fails only the requests
in it; the model thread carries on.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Job:
    pixels: np.ndarray
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """``submit(pixels)`` returns a future of ``predict``'s rows for those pixels, computed with other requests'."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int,
                 on_batch: Callable[[int], None] | None = None, on_wait: Callable[[float], None] | None = None):
        self.predict, self.max_batch, self.on_batch, self.on_wait = predict, max_batch, on_batch, on_wait
        self._queue: queue.Queue[_Job | None] = queue.Queue()  # None: close
        self._held: _Job | None = None  # a job that did not fit in the previous batch goes first next time
        threading.Thread(target=self._loop, name="microbatch", daemon=True).start()

    def submit(self, pixels: np.ndarray) -> Future:
        job = _Job(pixels)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Stop the thread once the jobs queued so far are answered (it holds the model: a retired version's memory
        is returned only then)."""
        self._queue.put(None)

    def _next_batch(self) -> list[_Job] | None:
        first = self._held or self._queue.get()
        if first is None:
            return None
        jobs, self._held = [first], None
        count = len(first.pixels)
        while count < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # closing: this batch first, then the thread ends
                self._queue.put(None)
                break
            if count + len(job.pixels) > self.max_batch:
                self._held = job
                break
            jobs.append(job)
            count += len(job.pixels)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            if self.on_wait:  # each request's time in the queue, until the call that carries it starts
                started = time.perf_counter()
                for job in jobs:
                    self.on_wait(started - job.queued)
            try:
                pixels = jobs[0].pixels if len(jobs) == 1 else np.concatenate([job.pixels for job in jobs])
                rows = self.predict(pixels)
            except BaseException as exc:  # noqa: BLE001 - every caller gets the error, the thread goes on
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            if self.on_batch:
                self.on_batch(len(pixels))
            start = 0
            for job in jobs:
                job.future.set_result(rows[start : start + len(job.pixels)])
                start += len(job.pixels)
