"""What HTTP workers share: the busier worker hands keep-alive clients back, the other does not; the server is ready
when every worker is."""

from __future__ import annotations

import asyncio
import contextlib
import os

from transferkit.service.balance import WorkerLoads, WorkerReadiness
from transferkit.service.middleware import Admission


def _worker(loads: WorkerLoads, release: asyncio.Event, handed_back: list | None = None) -> Admission:
    async def app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return Admission(app, max_in_flight=64, is_draining=lambda: False, track_request=contextlib.nullcontext,
                     loads=lambda: loads, on_hand_back=None if handed_back is None else lambda: handed_back.append(1))


async def _request(worker: Admission) -> list[tuple[bytes, bytes]]:
    sent = []

    async def send(message):
        if message["type"] == "http.response.start":
            sent.extend(message["headers"])

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    await worker({"type": "http", "path": "/predict"}, receive, send)
    return sent


def test_only_the_busier_worker_closes_connections(tmp_path):
    key = f"test-{os.getpid()}"
    loads = [WorkerLoads(2, 0, key=key), WorkerLoads(2, 1, key=key)]  # two workers, one shared file
    try:
        async def scenario():
            release_busy, release_idle = asyncio.Event(), asyncio.Event()
            busy, idle = _worker(loads[0], release_busy, handed_back), _worker(loads[1], release_idle)
            busy_requests = [asyncio.create_task(_request(busy)) for _ in range(4)]
            idle_request = asyncio.create_task(_request(idle))
            await asyncio.sleep(0.05)
            assert (busy.in_flight, idle.in_flight) == (4, 1)
            assert loads[1].least_other() == 4 and loads[0].least_other() == 1  # each sees the other's count
            release_idle.set()
            assert (b"connection", b"close") not in await idle_request  # the idle worker keeps its client
            release_busy.set()
            answers = await asyncio.gather(*busy_requests)
            return [(b"connection", b"close") in headers for headers in answers]

        handed_back: list = []
        closed = asyncio.run(scenario())
        # The busy worker had 4 in flight and the other 0: it hands clients back until it holds no more than the
        # other would (the responses go out in order: 3, 2, 1 left after each; then 0, which keeps its client).
        assert closed == [True, True, True, False]
        assert len(handed_back) == 3  # each one counted (transferkit_connections_handed_back on /metrics)
    finally:
        for slot in loads:
            slot.remove()


def test_a_single_worker_never_closes():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    admission = Admission(app, max_in_flight=4, is_draining=lambda: False, track_request=contextlib.nullcontext)
    assert (b"connection", b"close") not in asyncio.run(_request(admission))


def test_files_of_servers_that_are_gone_are_removed(tmp_path, monkeypatch):
    import subprocess
    import sys

    from transferkit.service import shared

    monkeypatch.setattr(shared, "directory", lambda: tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / f"transferkit-{kind}-{gone.stdout.strip()}" for kind in shared.KINDS]  # an exited server
    alive = tmp_path / f"transferkit-inflight-{os.getpid()}"  # this one
    foreign = tmp_path / f"transferkit-control-{gone.stdout.strip()}"  # not a kind of ours: never touched
    for path in [*stale, alive, foreign]:
        path.write_bytes(b"\0" * 8)
    loads = WorkerLoads(2, 0, key="fresh")
    try:
        assert not any(path.exists() for path in stale) and alive.exists() and foreign.exists()
        assert loads.path.exists()
    finally:
        loads.remove()
    shared.remove_server_files(str(os.getpid()))  # what the arbiter does at exit
    assert not alive.exists() and foreign.exists()


def test_the_server_is_ready_only_when_every_worker_is(tmp_path, monkeypatch):
    """A probe reaches one worker: the first to warm must not answer for the other (seen in CI: 200 from /readyz,
    then 503 from /v2/health/ready on the other worker)."""
    import threading
    import time

    from transferkit.service import shared

    monkeypatch.setattr(shared, "directory", lambda: tmp_path)
    second_ready = threading.Event()
    key = f"ready-{os.getpid()}"
    first = WorkerReadiness(2, 0, lambda: True, key=key)
    assert not first.others_ready()  # the second worker has not started: its slot is empty
    second = WorkerReadiness(2, 1, second_ready.is_set, key=key)
    try:
        assert first.others_ready() is False and second.others_ready() is True
        second_ready.set()
        deadline = time.monotonic() + 5
        while not first.others_ready() and time.monotonic() < deadline:
            time.sleep(0.05)  # the second worker's thread publishes within PUBLISH_EVERY_S
        assert first.others_ready()
        second.close()
        second.write(2**31 - 1, 1)  # "ready", from a process that is gone (killed, being restarted)
        assert not first.others_ready()
    finally:
        for worker in (first, second):
            worker.close()
        first.remove()


def test_a_failing_readiness_check_counts_as_not_ready_and_is_logged_once(tmp_path, monkeypatch, caplog):
    import time

    from transferkit.service import shared

    monkeypatch.setattr(shared, "directory", lambda: tmp_path)
    key = f"failing-{os.getpid()}"

    def broken() -> bool:
        raise RuntimeError("no models yet")

    first = WorkerReadiness(2, 0, lambda: True, key=key)
    with caplog.at_level("ERROR"):
        second = WorkerReadiness(2, 1, broken, key=key)
        try:
            assert second.publish() is False and not first.others_ready()
            time.sleep(0.6)  # two more publications by its thread
            assert caplog.text.count("the readiness check failed") == 1  # logged once, not at every publication
        finally:
            for worker in (first, second):
                worker.close()
            first.remove()
