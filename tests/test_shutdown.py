"""Shutdown under load, against a real ``bentoml serve`` (issue 16), and the launcher's own lifecycle (issue 15).

Load comes from many requests, not sleeps: each request carries two 6-megapixel PNGs (22 kB uploads that take ~0.1 s
each to decode) and the server decodes one request at a time per worker, so 40 of them keep it busy for seconds, and
its own in-progress gauge (``/metrics``) says when at least 32 are in flight before SIGTERM is sent.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serving import Server

from transferkit.core.manifest import RUNTIME_BACKENDS
from transferkit.service.launcher import BentoServer, wait_for_answer, worker_service

IN_FLIGHT = 40  # requests sent before SIGTERM
AT_LEAST_IN_FLIGHT = 32  # ... of which the server must hold this many when SIGTERM arrives
DRAIN_TIMEOUT_S = 30


def slow_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000), (90, 90, 90)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = slow_png()


def predict(url: str, timeout: float = 120, images: int = 1) -> requests.Response:
    return requests.post(url + "/predict", files=[("images", ("slow.png", PNG, "image/png"))] * images,
                         timeout=timeout)


def in_progress(url: str, endpoint: str = "/predict") -> float:
    """Requests the entry service holds right now, from BentoML's in-progress gauge."""
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "bentoml_service_request_in_progress" and sample.labels.get("endpoint") == endpoint
               and sample.labels.get("service_name") == "transferkit")


def outcome(call) -> int | str:
    """Status code, or the kind of connection failure."""
    try:
        return call().status_code
    except requests.ConnectionError:
        return "refused"


def port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def alive(processes) -> list[int]:
    return [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@dataclass
class Drain:
    """What happened when SIGTERM reached a loaded server."""

    held_at_sigterm: float
    in_flight: list = field(default_factory=list)  # status of each request sent before SIGTERM
    late: list = field(default_factory=list)  # (status or "refused", reason, Retry-After) of requests sent after
    readyz: int | str = "not probed"
    livez: int | str = "not probed"
    finished_when_unready: int = 0  # requests sent before SIGTERM that had been answered when /readyz turned 503
    exit_code: int | None = None
    log: str = ""


def drain_under_load(srv: Server) -> Drain:
    """Send IN_FLIGHT slow requests, SIGTERM the arbiter once the server holds AT_LEAST_IN_FLIGHT of them, then keep
    sending new requests (each on a new connection) until the server no longer answers."""
    srv.wait_ready()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        futures = [pool.submit(outcome, lambda: predict(srv.url, images=2)) for _ in range(IN_FLIGHT)]
        deadline = time.monotonic() + 60
        held = 0.0
        while held < AT_LEAST_IN_FLIGHT and time.monotonic() < deadline:
            held = in_progress(srv.url)
            time.sleep(0.02)
        srv.terminate()
        result = Drain(held_at_sigterm=held)
        # The signal reaches the workers through the arbiter a moment later: probe until readiness turns.
        deadline = time.monotonic() + 10
        while result.readyz != 503 and time.monotonic() < deadline and srv.running():
            result.readyz = outcome(lambda: srv.get("/readyz", timeout=10))
        result.livez = outcome(lambda: srv.get("/livez", timeout=10))
        result.finished_when_unready = sum(f.done() for f in futures)
        while srv.running() and len(result.late) < 50:
            try:
                response = predict(srv.url, timeout=60)
                body = response.json() if response.headers.get("content-type", "").startswith("application/json") \
                    else {}
                reason = body.get("reason") if isinstance(body, dict) else None
                result.late.append((response.status_code, reason, response.headers.get("retry-after")))
            except requests.ConnectionError:
                result.late.append(("refused", None, None))
                break  # the entry has stopped accepting: nothing later can be accepted either
            time.sleep(0.05)
        result.in_flight = [f.result() for f in futures]
    result.exit_code = srv.wait(DRAIN_TIMEOUT_S + 30)
    result.log = srv.log()[-4000:]
    return result


@pytest.fixture(scope="module", params=["inprocess", "batched"])
def drained(request, bundle, tmp_path_factory) -> Drain:
    """One loaded server per layout, SIGTERMed (``batched`` is the GPU layout, forced on CPU)."""
    log = tmp_path_factory.mktemp("shutdown") / f"{request.param}.log"
    # One decode at a time per worker, a long timeout and no latency budget: requests queue (in flight) instead of
    # being refused busy or overloaded.
    srv = Server(bundle, log, layout=request.param, max_concurrency=256, decode_concurrency=1, timeout_s=120,
                 drain_timeout_s=DRAIN_TIMEOUT_S, latency_budget_ms=0)
    try:
        yield drain_under_load(srv)
    finally:
        srv.stop()


def test_sigterm_completes_every_request_in_flight_and_exits_0(drained):
    assert drained.held_at_sigterm >= AT_LEAST_IN_FLIGHT, drained
    assert drained.in_flight == [200] * IN_FLIGHT, (drained.in_flight, drained.log)
    assert drained.exit_code == 0, drained.log


def test_requests_after_sigterm_are_refused_or_503_shutting_down_never_500(drained):
    assert drained.late, "no request was sent after SIGTERM"
    for status, reason, retry_after in drained.late:
        # 200: a worker that had not yet received the signal from the arbiter served it in full (a race, not a fault)
        assert status in ("refused", 200) or (status == 503 and reason == "shutting_down" and retry_after), \
            drained.late
    # The drain lasts while the in-flight requests decode: new requests land in it and get the 503.
    assert any(status == 503 for status, _, _ in drained.late), drained.late


def test_readiness_turns_503_while_liveness_stays_200_during_the_drain(drained):
    assert (drained.readyz, drained.livez) == (503, 200), drained
    assert drained.finished_when_unready < IN_FLIGHT, "readiness turned only after the drain had finished"


def test_kill_9_of_a_model_worker_under_load_gives_no_500_and_readiness_returns(bundle, tmp_path):
    # As inside a bento's container (BENTOML_CONTAINERIZED, where BentoML alone would not respawn a dead worker).
    srv = Server(bundle, tmp_path / "kill9.log", env={"BENTOML_CONTAINERIZED": "true"}, layout="batched",
                 model_workers=2, max_concurrency=256, latency_budget_ms=0)  # the load is held, never shed
    try:
        srv.wait_ready()
        model_workers = srv.workers("transferkit-model")
        assert len(model_workers) == 2, [(p.pid, p.cmdline()) for p in srv.workers()]
        statuses: list = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                statuses.append(outcome(lambda: predict(srv.url)))

        clients = [threading.Thread(target=client) for _ in range(12)]
        for thread in clients:
            thread.start()
        while len(statuses) < 24:  # under load before the kill
            time.sleep(0.05)
        model_workers[0].kill()
        before = len(statuses)
        while len(statuses) < before + 60:  # ... and after it
            time.sleep(0.05)
        stop.set()
        for thread in clients:
            thread.join()
        assert statuses and set(statuses) <= {200, 503}, (sorted(set(map(str, statuses))), srv.log()[-4000:])
        assert statuses.count(200) >= len(statuses) - 12, statuses  # at most the requests caught in the dying batch
        # A new model worker replaces the dead one, and the service is ready again.
        def replaced() -> bool:
            current = srv.workers("transferkit-model")
            return len(current) == 2 and model_workers[0].pid not in {p.pid for p in current}

        deadline = time.monotonic() + 120
        while not replaced() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert replaced(), f"no replacement model worker after 120 s:\n{srv.log()[-4000:]}"
        wait_for_answer(srv.url + "/readyz", max(1.0, deadline - time.monotonic()))
        assert predict(srv.url).status_code == 200
    finally:
        srv.stop()


def test_sigkill_of_the_arbiter_leaves_no_worker_serving_the_port(bundle, tmp_path):
    srv = Server(bundle, tmp_path / "orphans.log", drain_timeout_s=5)
    try:
        srv.wait_ready()
        workers = srv.workers()
        assert workers
        os.kill(srv.pid, signal.SIGKILL)
        srv.wait(10)
        deadline = time.monotonic() + 30  # generous: idle workers exit at once, a busy one within the drain timeout
        while (alive(workers) or port_answers(srv.port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(workers), f"workers outlived the arbiter: {alive(workers)}"
        assert not port_answers(srv.port)
    finally:
        srv.stop()


def test_ctrl_c_while_waiting_for_readiness_leaves_no_server(tmp_path, bundle):
    """A KeyboardInterrupt in ``wait_ready`` stops the half-started server: nothing keeps the port."""
    server = BentoServer(bundle, log_path=tmp_path / "interrupted.log")
    server.start()
    while not server.workers() and server.running():  # the arbiter has spawned its workers
        time.sleep(0.1)
    spawned = server.workers()
    find_workers = server.workers

    def ctrl_c_while_polling():
        # Ctrl-C (a KeyboardInterrupt in the main thread) arrives inside wait_ready's loop, whatever the timing: a
        # timer could fire after a quick server had already answered ready (it did once in CI, under load).
        server.workers = find_workers  # once: stop() looks for the workers too
        find_workers()
        raise KeyboardInterrupt

    server.workers = ctrl_c_while_polling
    with pytest.raises(KeyboardInterrupt):
        server.wait_ready(timeout=120)
    assert not server.running()
    assert not alive(spawned)
    assert not port_answers(server.port)


def test_transferkit_serve_drains_on_sigterm_and_its_server_dies_with_it(bundle, tmp_path):
    """The CLI in the foreground: ready line, SIGTERM -> orderly stop and exit 0; and SIGKILL of the CLI itself
    takes the server and its workers down (parent-death signal), leaving the port free."""
    from transferkit.core.system import free_port

    def start() -> tuple[subprocess.Popen, int, list[str]]:
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "transferkit", "serve", str(bundle), "--port", str(port),
                                    "--drain-timeout-s", "10"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: list[str] = []
        for line in process.stdout:  # up to the line after "ready:", which says what `auto` resolved to
            lines.append(line)
            if line.startswith("running: "):
                return process, port, lines
        pytest.fail("transferkit serve ended before it was ready:\n" + "".join(lines[-40:]))

    process, port, lines = start()
    assert predict(f"http://127.0.0.1:{port}").status_code == 200
    tree = psutil.Process(process.pid).children(recursive=True)
    assert {worker_service(p) for p in tree} >= {"transferkit"}
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 0, "".join(lines) + rest
    assert "stopped (bentoml serve exit code 0)" in rest
    assert not alive(tree) and not port_answers(port)
    assert any(line.startswith("ready: ") for line in lines)
    assert lines[-1].split()[1] in RUNTIME_BACKENDS and " layout " in lines[-1], lines[-1]  # the "running:" line

    process, port, lines = start()
    tree = psutil.Process(process.pid).children(recursive=True)
    process.kill()
    process.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while (alive(tree) or port_answers(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(tree), "the server outlived `transferkit serve`"
    assert not port_answers(port)


def test_lifecycle_is_inert_outside_a_server_process():
    """Importing the service (pytest, `bentoml build`) must not patch uvicorn or BentoML, nor touch the environment."""
    code = ("import os, uvicorn.server, bentoml._internal.utils.circus as c; "
            "from transferkit.service import lifecycle; "
            "before = (uvicorn.server.Server.handle_exit, c.Arbiter.stop, c.Arbiter.start); "
            "assert lifecycle.install_worker_lifecycle(5) is None; "
            "assert before == (uvicorn.server.Server.handle_exit, c.Arbiter.stop, c.Arbiter.start); "
            "assert lifecycle.ARBITER_PID_ENV not in os.environ and lifecycle.drain_timeout_s() == 5")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_track_request_counts_what_a_drain_waits_for():
    from transferkit.service import lifecycle

    assert lifecycle.in_flight() == 0 and lifecycle.wait_drained(0)
    with lifecycle.track_request(), lifecycle.track_request():
        assert lifecycle.in_flight() == 2
        assert not lifecycle.wait_drained(0.1)
    assert lifecycle.in_flight() == 0 and lifecycle.wait_drained(0)
