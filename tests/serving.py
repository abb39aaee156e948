"""A real ``bentoml serve`` of the transferkit service for tests: transferkit's own launcher plus HTTP shortcuts."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from transferkit.service.launcher import PROJECT_ROOT, BentoServer, ServerError

ROOT = PROJECT_ROOT


class Server(BentoServer):
    """``bentoml serve`` of ``model`` on a free loopback port, started at once, output in ``log_path``;
    ``settings`` become ``TRANSFERKIT_<NAME>`` variables, ``env`` adds others."""

    def __init__(self, model: Path | str, log_path: Path, env: dict[str, str] | None = None, **settings: str | int):
        # The tests compare answers with an onnxruntime predictor and check the layout they name: unless a test
        # asks for `auto`, the backend and the layout are pinned (tests/test_backends.py covers `auto`).
        for name, pinned in (("backend", "onnx"), ("layout", "inprocess")):
            if f"TRANSFERKIT_{name.upper()}" not in (env or {}):
                settings.setdefault(name, pinned)
        super().__init__(model, log_path=log_path, env=env, **settings)
        self.start()

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def wait_listening(self, timeout: float = 120) -> None:
        """Wait until ``/livez`` answers at all (ready or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise ServerError(f"bentoml serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/livez", timeout=2)
                return
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting up
                time.sleep(0.3)
        raise TimeoutError(f"server not listening after {timeout}s:\n{self.log()[-4000:]}")


@contextmanager
def ready_server(model: str | Path, log_path: Path, **settings: object) -> Iterator[Server]:
    """A started ``Server`` that is ready to answer, stopped when the block ends (module fixtures yield from it)."""
    srv = Server(model, log_path, **settings)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def tampered_copy(bundle: Path, dest: Path, position: float = 0.5) -> Path:
    """A copy of ``bundle`` whose model.onnx has one bit flipped at ``position`` (a fraction of its length)."""
    shutil.copytree(bundle, dest)
    data = bytearray((dest / "model.onnx").read_bytes())
    data[int(len(data) * position)] ^= 0x01
    (dest / "model.onnx").write_bytes(bytes(data))
    return dest
