"""Admission by latency budget: the prediction from a measured rate, and the middleware's answer (503 overloaded
with Retry-After, before the application sees the request). Served end to end: BENCHMARKS.md, "Overload"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

from transferkit.service.middleware import ADMITTED_AT, MEAN_SHARE_OF_BUDGET, Admission, LatencyBudget


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
    assert budget.rate() is None and budget.wait_s(50) == 0.0
    assert budget.refusal(60) is None  # no estimate and nothing measured: nothing to refuse on
    for _ in range(20):  # 0.1 s of work, then 10 s idle each time: the rate is 10/s, not 0.1/s
        _serve_one_at_a_time(budget, clock, 1, 0.1)
        clock.now += 10
    assert budget.rate() == pytest.approx(10.0)
    assert budget.wait_s(0) == 0.0  # an idle worker always admits
    assert budget.wait_s(9) == pytest.approx(1.0)
    assert budget.refusal(12) is None  # 1.3 s: within 0.7 of the budget (1.4 s), where admission aims the mean
    assert budget.refusal(14) is not None  # 1.5 s
    refusal = budget.refusal(30)  # 3.1 s predicted: 1.7 s past the aim
    assert (refusal.status, refusal.reason, refusal.retry_after) == (503, "overloaded", 2)


def test_the_warm_up_estimate_stands_in_until_eight_answers_are_measured():
    clock = Clock()
    budget = LatencyBudget(2.0, clock=clock, estimate=lambda: 20.0)  # warm inference: 50 ms a request
    assert budget.rate() == 20.0 and budget.refusal(26) is None  # (26 + 1) / 20 = 1.35 s: within 0.7 of the budget
    assert budget.refusal(28).retry_after == 1  # 1.45 s
    _serve_one_at_a_time(budget, clock, 7, 0.5)  # the real rate is 2/s: 7 answers are not yet a measurement
    assert budget.rate() == 20.0
    _serve_one_at_a_time(budget, clock, 1, 0.5)
    assert budget.rate() == pytest.approx(2.0) and budget.refusal(1) is None and budget.refusal(2) is not None


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
    assert budget.refusal(1).retry_after == 5  # (1 + 1) × 3 s − 1.4 s (0.7 of the budget), rounded up


def test_refused_clients_are_told_to_come_back_spread_at_the_admission_rate():
    """Thirty clients refused in the same instant by a worker that admits 10 a second: the first once the queue has
    drained (0.7 s), the others 0.1 s apart, so that they return as fast as requests can be taken in, not all in the
    next second to be refused again."""
    clock = Clock()
    budget = LatencyBudget(2.0, clock=clock)
    _serve_one_at_a_time(budget, clock, 10, 0.1)
    told = [budget.refusal(20).retry_after for _ in range(30)]  # 2.1 s predicted: 0.7 s past the aim
    assert told == sorted(told) and told[0] == 1 and told[-1] == 4  # 0.7 s + 29 × 0.1 s, rounded up
    assert max(told.count(seconds) for seconds in set(told)) <= 11  # about the worker's rate, per second
    assert [budget.refusal(20).retry_after for _ in range(400)][-1] == 30  # never past the cap
    clock.now += 31  # the schedule's slots are past: the next refused client waits only for the queue
    assert budget.refusal(20).retry_after == 1


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
        admission = _admission(0.55 / MEAN_SHARE_OF_BUDGET, release, seen)  # the mean aimed at 0.55 s
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


def test_model_control_passes_a_saturated_worker_and_the_drain_still_refuses_it():
    """An operator's unload is what relieves a saturated server: neither the in-flight cap nor the budget refuses it,
    and it neither counts against them nor as a measured answer."""
    async def scenario():
        release, seen, admitted = asyncio.Event(), [], []

        async def app(scope, receive, send):
            seen.append(scope["path"])
            admitted.append(ADMITTED_AT.get())  # where the model's late refusal counts from
            if scope["path"] == "/predict":
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        draining = []
        admission = Admission(app, max_in_flight=1, is_draining=lambda: bool(draining),
                              track_request=contextlib.nullcontext, latency_budget_s=1.0, estimated_rate=lambda: 0.5,
                              unmetered="/v2/repository/")
        held = asyncio.create_task(_call(admission))  # the one request the cap allows: 2 s predicted for the next
        await asyncio.sleep(0.01)
        refused = await _call(admission)
        control = await _call(admission, "/v2/repository/models/a/unload")
        counts = admission.in_flight, admission.work_in_flight
        draining.append(True)
        during_drain = await _call(admission, "/v2/repository/models/a/load")
        release.set()
        await held
        return refused[0], control[0], counts, during_drain, seen, admitted

    before = time.perf_counter()
    refused, control, counts, during_drain, seen, admitted = asyncio.run(scenario())
    when, behind_others = admitted[0]  # the first request: nothing in flight ahead of it
    assert before < when < time.perf_counter() and behind_others is False
    assert refused == 429 and control == 200 and counts == (1, 1)
    assert during_drain[0] == 503 and json.loads(during_drain[2])["reason"] == "shutting_down"
    assert seen == ["/predict", "/v2/repository/models/a/unload"]


def test_the_decode_gate_admits_in_arrival_order_and_skips_who_gave_up():
    """The gate is the in-process layout's queue for the compute threads: first come, first served (a newcomer
    never takes a slot freed for a waiter), and a waiter that times out or disconnects leaves no hole."""
    from transferkit.core.errors import ServiceError
    from transferkit.service.decoding import DecodeGate

    async def scenario():
        gate, order = DecodeGate(slots=1, budget=10**9), []

        async def request(name: str, hold: asyncio.Event, wait_s: float = 5.0):
            try:
                async with gate.admit(1, wait_s):
                    order.append(name)
                    await hold.wait()
            except ServiceError as exc:
                order.append(f"{name}: {exc.reason}")

        release = {name: asyncio.Event() for name in "abcde"}
        tasks = [asyncio.create_task(request("a", release["a"]))]
        await asyncio.sleep(0.01)
        tasks += [asyncio.create_task(request("b", release["b"]))]
        await asyncio.sleep(0.01)
        tasks += [asyncio.create_task(request("c", release["c"], wait_s=0.05))]  # gives up while "a" holds
        await asyncio.sleep(0.01)
        tasks += [asyncio.create_task(request("d", release["d"]))]
        gone = asyncio.create_task(request("e", release["e"]))  # its client disconnects while it waits
        await asyncio.sleep(0.1)
        gone.cancel()
        release["a"].set()  # frees the slot; a newcomer arriving now must queue behind "b" and "d"
        tasks += [asyncio.create_task(request("f", asyncio.Event()))]
        await asyncio.sleep(0.01)
        release["b"].set()
        await asyncio.sleep(0.01)
        release["d"].set()
        await asyncio.sleep(0.01)
        return order

    assert asyncio.run(scenario()) == ["a", "c: busy", "b", "d", "f"]


def test_a_newcomer_that_would_fit_still_queues_behind_a_waiter():
    from transferkit.service.decoding import DecodeGate

    async def scenario():
        gate, order, hold = DecodeGate(slots=2, budget=10), [], asyncio.Event()

        async def request(name: str, cost: int):
            async with gate.admit(cost, 5.0):
                order.append(name)
                await hold.wait()

        tasks = [asyncio.create_task(request("big", 6))]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(request("second big", 6)))  # waits: 12 of 10 bytes
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(request("small", 1)))  # would fit now, beside "big"
        await asyncio.sleep(0.05)
        admitted_before_release = list(order)
        hold.set()
        await asyncio.gather(*tasks)
        return admitted_before_release, order

    before, order = asyncio.run(scenario())
    assert before == ["big"] and order == ["big", "second big", "small"]
