"""Connection balancing between HTTP workers: the busier worker hands keep-alive clients back, the other does not."""

from __future__ import annotations

import asyncio
import contextlib
import os

from transferkit.service.balance import WorkerLoads
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
            slot._remove()


def test_a_single_worker_never_closes():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    admission = Admission(app, max_in_flight=4, is_draining=lambda: False, track_request=contextlib.nullcontext)
    assert (b"connection", b"close") not in asyncio.run(_request(admission))


def test_files_of_servers_that_are_gone_are_removed(tmp_path, monkeypatch):
    import subprocess
    import sys

    from transferkit.service import balance

    monkeypatch.setattr(balance, "_directory", lambda: tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{balance.PREFIX}{gone.stdout.strip()}"  # a process that has exited
    alive = tmp_path / f"{balance.PREFIX}{os.getpid()}"  # this one
    stale.write_bytes(b"\0" * 8)
    alive.write_bytes(b"\0" * 8)
    loads = WorkerLoads(2, 0, key="fresh")
    try:
        assert not stale.exists() and alive.exists() and loads.path.exists()
    finally:
        loads._remove()
