"""The one way transferkit starts and stops a ``bentoml serve`` of its service (CLI, load tests, demo, tests).

    with BentoServer(bundle_dir, backend="onnx", log_path=out / "service.log") as server:
        requests.post(server.url + "/predict", ...)

- ``start()`` spawns ``python -m bentoml serve transferkit.service.service:ImageClassifier`` from the project root
  with the settings as ``TRANSFERKIT_*`` variables, in a session of its own (a Ctrl-C in the terminal reaches this
  process, which then stops the server in order), with the parent-death signal set: if this process dies, even by
  SIGKILL, the server gets SIGTERM, drains and exits; its workers follow it (service/lifecycle.py).
- ``wait_ready()`` polls ``/readyz``; if it fails, times out or is interrupted (Ctrl-C), it stops the server before
  raising, so no server is left holding the port.
- ``stop()`` sends SIGTERM to the arbiter (it drains the entry workers, then the model workers), waits up to the drain
  timeout plus a margin, then SIGKILLs the arbiter and every worker it had (by pid, pid reuse checked).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from transferkit.core.errors import TransferkitError
from transferkit.core.system import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "transferkit.service.service:ImageClassifier"
DRAIN_TIMEOUT_ENV = "TRANSFERKIT_DRAIN_TIMEOUT_S"
STOP_MARGIN_S = 15.0  # beyond the drain timeout: the model workers' own stop and the arbiter's exit


class ServerError(TransferkitError):
    """The server exited or never became ready."""

    exit_code = 1
    reason = "server_failed"


def _libc_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


# Looked up here, in the parent: a dlopen() between fork and exec can deadlock when other threads held the loader lock.
_PRCTL = _libc_prctl()


def _die_with_parent(parent: int) -> None:
    """In the child between fork and exec: SIGTERM when ``parent`` dies (and exit if it already has)."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG; survives exec
    if os.getppid() != parent:
        os._exit(1)


class BentoServer:
    """One ``bentoml serve`` of the transferkit service on ``host:port`` (a free loopback port by default).

    ``model``: a BentoML model tag or a bundle directory. ``settings``: service settings as keyword names
    (``backend="onnx"``, ``max_batch_size=8``) set as ``TRANSFERKIT_<NAME>``. ``env``: extra environment variables.
    ``log_path``: where the server's output goes (None: this process's stdout/stderr).
    """

    def __init__(self, model: str | Path | None, *, host: str = "127.0.0.1", port: int | None = None,
                 log_path: Path | None = None, env: Mapping[str, str] | None = None, service: str = SERVICE,
                 working_dir: Path = PROJECT_ROOT, die_with_parent: bool = True, **settings: object):
        if model is not None and Path(model).is_dir():  # the server runs from the project root
            model = str(Path(model).resolve())
        self.model = None if model is None else str(model)
        self.host = host
        self.port = port or free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.url = f"http://{probe_host}:{self.port}"
        self.log_path = log_path
        self.service = service
        self.working_dir = Path(working_dir)
        self.die_with_parent = die_with_parent
        self.environment = {
            **os.environ, "BENTOML_DO_NOT_TRACK": "true",
            **({"TRANSFERKIT_MODEL": self.model} if self.model else {}),
            **{f"TRANSFERKIT_{key.upper()}": str(value) for key, value in settings.items() if value is not None},
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None
        self._log: IO | None = None
        self._seen: dict[int, object] = {}  # pid -> psutil.Process of every worker seen, to kill orphans later

    # ------------------------------------------------------------------------------------------------- lifecycle

    @property
    def drain_timeout_s(self) -> float:
        try:
            return float(self.environment.get(DRAIN_TIMEOUT_ENV) or 30)
        except ValueError:
            return 30.0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bentoml", "serve", self.service, "--working-dir", str(self.working_dir),
                "--host", self.host, "--port", str(self.port)]

    def start(self) -> BentoServer:
        """Spawn the server (does not wait; see :meth:`wait_ready`)."""
        if self.process is not None:
            raise ServerError("this server was already started")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("w")
        parent = os.getpid()
        self.process = subprocess.Popen(
            self.command(), env=self.environment, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,
            preexec_fn=(lambda: _die_with_parent(parent)) if self.die_with_parent and _PRCTL else None,  # noqa: PLW1509
        )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 180) -> BentoServer:
        """Wait until ``/readyz`` answers 200. On failure, timeout or Ctrl-C: stop the server, then raise."""
        import requests

        try:
            deadline = time.monotonic() + timeout
            while True:
                if self.process is None:
                    raise ServerError("the server was not started")
                if self.process.poll() is not None:
                    raise ServerError(f"bentoml serve exited with code {self.process.returncode} while starting"
                                      f"{self._log_hint()}")
                self.workers()  # remember the workers while they can be found
                with contextlib.suppress(requests.RequestException):
                    if requests.get(self.url + "/readyz", timeout=3).status_code == 200:
                        return self
                if time.monotonic() >= deadline:
                    raise ServerError(f"the server was not ready after {timeout:.0f} s{self._log_hint()}")
                time.sleep(0.3)
        except BaseException:  # KeyboardInterrupt included: never leave a half-started server on the port
            self.stop()
            raise

    def terminate(self) -> None:
        """SIGTERM to the arbiter only: what ``docker stop`` and Kubernetes do. It drains and stops its workers."""
        if self.running():
            self.workers()
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the arbiter to exit; its exit code (raises subprocess.TimeoutExpired)."""
        return self.process.wait(timeout)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` (default: drain timeout + 15 s), then SIGKILL the arbiter and every worker
        it had. Returns the arbiter's exit code (None if it was never started)."""
        if self.process is None:
            return None
        timeout = self.drain_timeout_s + STOP_MARGIN_S if timeout is None else timeout
        try:
            self.terminate()
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
        except BaseException:  # interrupted while waiting (a second Ctrl-C): do not leave it running
            self.process.kill()
            raise
        finally:
            self.kill_orphans()
            if self._log is not None:
                self._log.close()
        return code

    def kill_orphans(self) -> list[int]:
        """SIGKILL every worker seen earlier that still runs (after the arbiter has gone); their pids."""
        import psutil

        killed = []
        for pid, process in list(self._seen.items()):
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:  # is_running: same create time
                    process.kill()
                    killed.append(pid)
        return killed

    def __enter__(self) -> BentoServer:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------------- inspection

    def workers(self, service_name: str | None = None) -> list:
        """The arbiter's worker processes (psutil), optionally only those of one BentoML service
        (``"transferkit"``: the HTTP entry; ``"transferkit-model"``: model workers where that layout runs)."""
        import psutil

        if not self.running():
            return []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []
        found = []
        for child in children:
            self._seen.setdefault(child.pid, child)
            if service_name is None or worker_service(child) == service_name:
                found.append(child)
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.is_file() else ""

    def _log_hint(self) -> str:
        if self.log_path is None:
            return " (its output is above)"
        tail = self.log()[-3000:]
        return f"; see {self.log_path}" + (f":\n{tail}" if tail else "")


def worker_service(process) -> str | None:
    """The BentoML service a worker process serves, from its command line (``--service-name NAME``)."""
    import psutil

    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return None
    if "--service-name" in cmdline[:-1]:
        return cmdline[cmdline.index("--service-name") + 1]
    return None


def serve_in_foreground(server: BentoServer, on_ready: Callable[[BentoServer], None] | None = None) -> int:
    """Run ``server`` until it exits; SIGTERM, SIGINT or SIGHUP to this process stops it in order (a second one
    kills it). ``on_ready`` is called once ``/readyz`` first answers 200 (a server that never gets ready, e.g. a
    refused bundle, keeps running unready, as under an orchestrator). Returns the server's exit code."""
    import requests

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        if len(received) == 1:
            server.terminate()
        else:
            server.kill_orphans()
            if server.running():
                server.process.kill()

    previous = {sig: signal.signal(sig, forward) for sig in signals}
    try:
        server.start()
        ready = False
        while True:
            try:
                code = server.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                server.workers()  # keep the worker list current (respawns) for the orphan sweep
            if not ready and not received and on_ready is not None:
                with contextlib.suppress(requests.RequestException):
                    ready = requests.get(server.url + "/readyz", timeout=2).status_code == 200
                    if ready:
                        on_ready(server)
        server.kill_orphans()
        if not ready and not received and on_ready is not None:
            raise ServerError(f"bentoml serve exited with code {code} before it was ready{server._log_hint()}")
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
