"""benchmarks/locustfile.py run by locust against a tiny server that answers badly on purpose: every bad answer is a
counted failure with its status and body, never an exception inside a locust user (which locust logs instead of
counting the request)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from transferkit.service.launcher import PROJECT_ROOT

# (status, body, Content-Type or None): what a broken server or a proxy in front of it may answer.
BAD_ANSWERS = [
    (500, b"", None),
    (500, b"<html><body>upstream oops</body></html>", "text/html"),
    (500, b'{"detail": "no error key here"}', "application/json"),
    (500, b"[1, 2, 3]", "application/json"),
    (400, b"plain refusal, not JSON", "text/plain"),
    (200, b"garbage that is not JSON", "application/json"),
    (503, b'{"error": "busy", "reason": "overloaded"}', "application/json"),  # no Retry-After: the client can't wait
    (0, b"", None),  # the connection closed with no answer at all (a crash, a reset)
]


class BadServer(BaseHTTPRequestHandler):
    answers = itertools.cycle(BAD_ANSWERS)
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, status: int, body: bytes, content_type: str | None) -> None:
        if not status:
            self.close_connection = True
            return
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(200, json.dumps({"classes": ["a", "b"]}).encode(), "application/json")

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.lock:
            answer = next(self.answers)
        self._answer(*answer)


@pytest.fixture
def bad_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BadServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_locustfile_reports_any_bad_answer_as_a_failure_without_an_exception(bad_server, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (50, 60, 70)).save(buffer, "PNG")
    (images / "one.png").write_bytes(buffer.getvalue())  # one small file: no seconds spent generating the workload
    prefix = tmp_path / "locust"
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(PROJECT_ROOT / "benchmarks" / "locustfile.py"), "--headless",
         "--host", bad_server, "-u", "2", "-r", "2", "-t", "3s", "--csv", str(prefix), "--only-summary",
         "--exit-code-on-error", "0"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TRANSFERKIT_LOADTEST_IMAGES": str(images)})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    with open(f"{prefix}_exceptions.csv") as handle:
        assert list(csv.DictReader(handle)) == [], output[-3000:]  # nothing raised inside a user
    with open(f"{prefix}_stats.csv") as handle:
        stats = {row["Name"]: row for row in csv.DictReader(handle)}
    posted = [row for name, row in stats.items() if name.startswith(("/predict", "bad input"))]
    sent = sum(int(row["Request Count"]) for row in posted)
    assert sent >= len(BAD_ANSWERS), stats
    # Every answer of this server is wrong, so every request it answered is a failure, and none went unreported.
    assert sum(int(row["Failure Count"]) for row in posted) == sent, stats
    with open(f"{prefix}_failures.csv") as handle:
        errors = "\n".join(row["Error"] for row in csv.DictReader(handle))
    for expected in ("HTTP 500: (empty body)", "HTTP 500: <html><body>upstream oops", 'HTTP 500: {"detail"',
                     "HTTP 500: [1, 2, 3]", "HTTP 400: plain refusal", "the answer is not JSON",
                     "HTTP 503 without a usable Retry-After (None)", "no answer (the connection failed): "):
        assert expected in errors, errors
