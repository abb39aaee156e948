"""Start and stop a real ``bentoml serve`` of the transferkit service on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from transferkit.core.system import free_port

ROOT = Path(__file__).resolve().parent.parent


class Server:
    """``bentoml serve transferkit.service.service:ImageClassifier`` in its own process group, output in
    ``log_path``."""

    def __init__(self, model: Path | str, log_path: Path, **settings: str | int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "TRANSFERKIT_MODEL": str(model), "BENTOML_DO_NOT_TRACK": "true",
               **{f"TRANSFERKIT_{k.upper()}": str(v) for k, v in settings.items()}}
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "transferkit.service.service:ImageClassifier", "--working-dir",
             str(ROOT), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def wait_listening(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/livez", timeout=2)
                return
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting up
                time.sleep(0.3)
        raise TimeoutError(f"server not listening after {timeout}s:\n{self.log()[-4000:]}")

    def wait_ready(self, timeout: float = 120) -> None:
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get("/readyz", timeout=5).status_code == 200:
                return
            time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()[-4000:]}")

    def terminate(self) -> None:
        """SIGTERM to the whole process group (what a container runtime or Ctrl-C does)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 30) -> int:
        self.terminate()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        self._log.close()
        return code
