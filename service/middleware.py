"""ASGI middleware of the entry service: admission (drain, concurrency) and a request-body cap.

Both run inside BentoML's middleware, which runs inside the route guard (service/guard.py: unknown paths, wrong
methods and missing tokens never get here). :class:`Admission` runs first. Probes and /metrics always pass. While
the process drains after SIGTERM every other request is answered 503 ``shutting_down`` with ``Retry-After`` (never a
500, never a dropped connection); past the worker's share of ``max_concurrency`` it is 429 ``overloaded``;
otherwise, when the requests already in flight would keep it from being answered within the latency budget
(:class:`LatencyBudget`), it is 503 ``overloaded`` with a Retry-After derived from that queue; otherwise the request is
counted as in flight (:func:`track_request`) so that the drain waits for it. Model control (``unmetered``: an
operator's load or unload) skips the cap and the budget: it is what an operator sends to relieve a saturated
server. This replaces BentoML's own limiter, which would also refuse the Open Inference Protocol's health probes
under load.

:class:`BodySizeLimit`: BentoML's server has no body limit. A declared Content-Length over the cap is refused before
one byte of the body is read; a chunked body is counted as it arrives and refused as soon as it passes the cap (the
rest is never buffered). Bodies under the cap are buffered here and replayed to the application unchanged.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

from transferkit.core.errors import ServiceError
from transferkit.service.errors import error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


async def refuse(scope: Scope, receive, send, error: ServiceError, headers: Mapping[str, str] | None = None) -> None:
    """Answer ``error`` before the application sees the request, in the same shape the routes answer with."""
    await error_response(error, headers)(scope, receive, send)


# When admission let the current request in (time.perf_counter()) and whether model work was in flight then: the
# late refusal (service/runtime.py) counts from there, the body's upload included (a burst of uploads on one event
# loop makes it long), and only for a request that queued behind others (alone, a slow upload or a model slower than
# the budget frees nothing by being refused).
ADMITTED_AT: ContextVar[tuple[float, bool] | None] = ContextVar("transferkit_admitted_at", default=None)

PROBES = frozenset({"/livez", "/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


MEAN_SHARE_OF_BUDGET = 0.7  # see LatencyBudget.refusal
MEASURED_AFTER = 8  # answers before the measured rate replaces the warm-up's estimate
MAX_RETRY_AFTER_S = 30  # a client told to wait longer would rather go elsewhere


class LatencyBudget:
    """Predicts when a request admitted now would be answered: the requests in flight plus this one, divided by the
    rate at which this worker completes requests *while it has work* (a clock that runs only while something is in
    flight, so that idle time between light traffic does not read as slowness). The rate is measured, never
    configured: the same budget holds for a 10 ms and a 1 s model, on any CPU or GPU.

    Shedding at admission is what keeps the accepted requests' latency bounded: a request refused here costs no body
    read, no decode and no inference, so the work the server does is all work it can finish in time, and a load
    balancer or client can go elsewhere at once (Retry-After: a return slot after the queue ahead has drained, see
    :meth:`_retry_after`). A worker with nothing in flight always admits (a model slower than the budget still answers
    one request at a time).

    Until :data:`MEASURED_AFTER` answers are known, ``estimate()`` stands in: the rate the worker's model showed when
    it was warmed (inference alone, so an optimistic figure: a burst on a new worker is admitted rather than guessed
    away). Without an estimate (the model runs in another process) nothing is refused until the rate is measured."""

    def __init__(self, budget_s: float, window: int = 64, clock: Callable[[], float] = time.monotonic,
                 estimate: Callable[[], float | None] = lambda: None) -> None:
        self.budget_s = budget_s
        self._clock = clock
        self._estimate = estimate
        self._busy = 0.0  # seconds with at least one request in flight
        self._since: float | None = None  # when in-flight last changed, while it is > 0
        self._done: deque[float] = deque(maxlen=window)  # the busy clock at each of the last completions
        self._next_return = 0.0  # the wall-clock time the next refused client is asked to come back at

    def _advance(self, in_flight: int) -> float:
        now = self._clock()
        if self._since is not None:
            self._busy += now - self._since
        self._since = now if in_flight > 0 else None
        return self._busy

    def started(self, in_flight: int) -> None:
        """A request was admitted; ``in_flight`` counts it."""
        self._advance(in_flight)

    def finished(self, in_flight: int, answered: bool = True) -> None:
        """A request ended; ``in_flight`` no longer counts it. Only ``answered`` ones (200) count as completions."""
        busy = self._advance(in_flight)
        if answered:
            self._done.append(busy)

    def rate(self) -> float | None:
        """Completions per busy second over the last ``window``; until :data:`MEASURED_AFTER` are known, the
        warm-up's estimate (None without one)."""
        if len(self._done) < MEASURED_AFTER or self._done[-1] <= self._done[0]:
            return self._estimate()
        return (len(self._done) - 1) / (self._done[-1] - self._done[0])

    def wait_s(self, in_flight: int) -> float:
        """Seconds until a request admitted now would be answered (0 while nothing is in flight or while no rate is
        known)."""
        rate = self.rate()
        return 0.0 if in_flight == 0 or not rate else (in_flight + 1) / rate

    def refusal(self, in_flight: int) -> ServiceError | None:
        """The 503 for a request that would miss the budget, else None. The prediction is a mean, and requests do
        not all take the mean (the images they carry, the event loop answering refusals between them), so admission
        aims the mean at 0.7 of the budget (ResNet50, 128 users: p99 1.7 s with a 2 s budget; aiming at the whole
        budget put p99 at 1.5x the median, at half of it a 16-user load saw a request shed; BENCHMARKS.md,
        "Overload")."""
        wait = self.wait_s(in_flight)
        target = self.budget_s * MEAN_SHARE_OF_BUDGET
        if wait <= target:
            return None
        retry = self._retry_after(wait - target)
        return ServiceError(503, "overloaded", f"the server could not answer within its latency budget "
                                               f"({self.budget_s:g} s; about {wait:.1f} s of requests are ahead); "
                                               f"retry after {retry} s or elsewhere", retry_after=retry)

    def _retry_after(self, drain_s: float) -> int:
        """Seconds a refused client should wait: until the queue ahead has drained, and past the clients refused
        before it, which come back one per 1/rate seconds. Told the same second, every refused client returns at
        once and is refused again; at 128 users on two cores that was ~107 refusals a second, each an upload read and
        answered for nothing, and the accepted throughput fell to 0.67-0.77x the 16-user figure (0.92-1.05x with the
        slots; BENCHMARKS.md, first section). The schedule restarts from now once its slots are past, so clients that
        went elsewhere hold nobody back for long."""
        now = self._clock()
        slot = min(max(now + drain_s, self._next_return), now + MAX_RETRY_AFTER_S)
        self._next_return = slot + 1.0 / (self.rate() or 1.0)
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(slot - now)))


class Admission:
    """Drain-aware admission: 503 while draining, 429 past ``max_in_flight``, else tracked as in flight.

    With ``loads`` (several HTTP workers sharing one socket: :mod:`transferkit.service.balance`), a response from a
    worker that will still have more requests in flight than the least busy other worker carries
    ``Connection: close``, so its client reconnects and may land on a less busy worker."""

    def __init__(self, app: ASGIApp, max_in_flight: int, is_draining: Callable[[], bool], track_request,
                 on_reject: Callable[[str], None] | None = None, loads: Callable[[], Any] | None = None,
                 on_hand_back: Callable[[], None] | None = None, latency_budget_s: float = 0.0,
                 estimated_rate: Callable[[], float | None] = lambda: None, unmetered: str | None = None):
        self.app = app
        # Model control (an operator's load or unload) is not traffic: a saturated server must still take it.
        self.unmetered = unmetered
        self.budget = LatencyBudget(latency_budget_s, estimate=estimated_rate) if latency_budget_s > 0 else None
        self.on_hand_back = on_hand_back or (lambda: None)
        self.max_in_flight = max_in_flight
        self.is_draining = is_draining
        self.track_request = track_request
        self.on_reject = on_reject or (lambda reason: None)
        self._make_loads = loads  # built on the first request: the worker's index is known by then
        self._loads: Any = None
        self.in_flight = 0
        self.work_in_flight = 0  # POSTs: what the latency budget is about

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        if self.is_draining():
            self.on_reject("shutting_down")
            await refuse(scope, receive, send, ServiceError(
                503, "shutting_down", "the server is shutting down; retry on another instance", retry_after=1))
            return
        if self.unmetered is not None and scope["path"].startswith(self.unmetered):
            with self.track_request():
                await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            self.on_reject("overloaded")
            await refuse(scope, receive, send, ServiceError(
                429, "overloaded", f"too many requests in flight (at most {self.max_in_flight} per worker); retry "
                                   f"with backoff", retry_after=1))
            return
        # The budget is about model work: POSTs (/predict, /v2 infer). /metadata and the like are answered in
        # microseconds and would make the worker's rate look many times what it is.
        work = self.budget is not None and scope.get("method") == "POST"
        refusal = self.budget.refusal(self.work_in_flight) if work else None
        if refusal is not None:
            self.on_reject("overloaded")
            await refuse(scope, receive, send, refusal)
            return
        if self._make_loads is not None and self._loads is None:
            self._loads = self._make_loads()
        self._count(+1, work)
        admitted = ADMITTED_AT.set((time.perf_counter(), self.work_in_flight > 1))
        status = {"code": 500}
        try:
            with self.track_request():
                await self.app(scope, receive, self._observing(send if self._loads is None else self._balancing(send),
                                                               status))
        finally:
            ADMITTED_AT.reset(admitted)
            self._count(-1, work, answered=status["code"] == 200)

    def _count(self, change: int, work: bool, answered: bool = False) -> None:
        self.in_flight += change
        if work:  # only answers count as completions: a refused image costs the model nothing
            self.work_in_flight += change
            if change > 0:
                self.budget.started(self.work_in_flight)
            else:
                self.budget.finished(self.work_in_flight, answered)
        if self._loads is not None:
            self._loads.set(self.in_flight)

    @staticmethod
    def _observing(send, status: dict):
        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        return send_observed

    def _balancing(self, send):
        async def send_balanced(message: Message) -> None:
            # After this response this worker holds in_flight - 1 requests; hand the client back if that is more
            # than another worker holds (only the busier side closes, so connections drift towards balance).
            if message["type"] == "http.response.start" and self.in_flight - 1 > self._loads.least_other():
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                self.on_hand_back()
            await send(message)

        return send_balanced


class BodySizeLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413 and a JSON error."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[], None] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject or (lambda: None)

    async def _reject(self, scope: Scope, receive, send) -> None:
        self.on_reject()
        # The rest of the body stays unread: the connection cannot carry another request.
        await refuse(scope, receive, send, ServiceError(
            413, "body_too_large", f"request body too large: the limit is {self.max_bytes / 1024 / 1024:g} MiB"),
            {"Connection": "close"})

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                await refuse(scope, receive, send, ServiceError(400, "bad_request", "invalid Content-Length header"))
                return
            if too_large:
                await self._reject(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would report it

        await self.app(scope, replay, send)
