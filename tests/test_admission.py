"""Admission by latency budget: the prediction from a measured rate, and the middleware's answer (503 overloaded
with Retry-After, before the application sees the request). Served end to end: BENCHMARKS.md, "Overload"."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from transferkit.service.middleware import Admission, LatencyBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _serve_one_at_a_time(budget: LatencyBudget, clock: Clock, count: int, seconds: float) -> None:
    for _ in range(count):
        budget.started(1)
        clock.now += seconds
        budget.finished(0)


def test_the_rate_counts_only_busy_time():
    clock = Clock()
    budget = LatencyBudget(2.0, clock=clock)
    assert budget.rate() is None and budget.wait_s(50) == 0.0  # nothing measured yet: admit
    for _ in range(20):  # 0.1 s of work, then 10 s idle each time: the rate is 10/s, not 0.1/s
        _serve_one_at_a_time(budget, clock, 1, 0.1)
        clock.now += 10
    assert budget.rate() == pytest.approx(10.0)
    assert budget.wait_s(0) == 0.0  # an idle worker always admits
    assert budget.wait_s(9) == pytest.approx(1.0)
    assert budget.refusal(18) is None  # 1.9 s: within the budget
    refusal = budget.refusal(30)  # 3.1 s predicted
    assert (refusal.status, refusal.reason, refusal.retry_after) == (503, "overloaded", 2)


def test_requests_in_parallel_raise_the_rate():
    clock = Clock()
    budget = LatencyBudget(2.0, clock=clock)
    for _ in range(10):  # four at a time, each batch 0.2 s: 20 requests per busy second
        for in_flight in range(1, 5):
            budget.started(in_flight)
        clock.now += 0.2
        for in_flight in range(3, -1, -1):
            budget.finished(in_flight)
    assert budget.rate() == pytest.approx(39 / 1.8)  # 39 intervals over the busy clock from the first to the last


def test_a_model_slower_than_the_budget_still_answers_one_at_a_time():
    clock = Clock()
    budget = LatencyBudget(2.0, clock=clock)
    _serve_one_at_a_time(budget, clock, 10, 3.0)
    assert budget.refusal(0) is None
    assert budget.refusal(1).retry_after == 4  # (1 + 1) × 3 s − 2 s


def _admission(budget_s: float, release: asyncio.Event, seen: list) -> Admission:
    async def app(scope, receive, send):
        seen.append(scope["path"])
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return Admission(app, max_in_flight=64, is_draining=lambda: False, track_request=contextlib.nullcontext,
                     latency_budget_s=budget_s)


async def _call(admission: Admission, path: str = "/predict") -> tuple[int, dict, bytes]:
    answer: dict = {"body": b""}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"], answer["headers"] = message["status"], dict(message["headers"])
        else:
            answer["body"] += message.get("body", b"")

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    await admission({"type": "http", "path": path, "method": "POST", "headers": []}, receive, send)
    return answer["status"], answer["headers"], answer["body"]


def test_the_middleware_sheds_past_the_budget_and_never_the_probes():
    async def scenario():
        release, seen = asyncio.Event(), []
        admission = _admission(0.55, release, seen)
        clock = Clock()
        admission.budget._clock = clock
        _serve_one_at_a_time(admission.budget, clock, 10, 0.1)  # measured: 10 requests per busy second
        held = [asyncio.create_task(_call(admission)) for _ in range(4)]  # 4 in flight: (4 + 1) / 10 = 0.5 s
        await asyncio.sleep(0.01)
        fits = len(seen)
        extra = asyncio.create_task(_call(admission))  # the fifth: 0.5 s, within 0.55
        await asyncio.sleep(0.01)
        status, headers, body = await _call(admission)  # the sixth: 0.6 s predicted
        probe = asyncio.create_task(_call(admission, "/readyz"))
        await asyncio.sleep(0.01)
        release.set()
        answered = [s for s, _, _ in await asyncio.gather(*held, extra, probe)]
        return fits, status, headers, json.loads(body), answered, seen

    fits, status, headers, body, answered, seen = asyncio.run(scenario())
    assert fits == 4 and answered == [200] * 6
    assert status == 503 and body["reason"] == "overloaded" and "latency budget" in body["error"]
    assert headers[b"retry-after"] == b"1"
    assert seen.count("/predict") == 5  # the shed request never reached the application
