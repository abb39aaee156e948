"""The one way transferkit starts and stops a server: ``bentoml serve`` of its service (CLI, load tests, demo,
tests), and any other server process (the load test's baseline) through the same :class:`ServerProcess`.

    with BentoServer(bundle_dir, backend="onnx", log_path=out / "service.log") as server:
        requests.post(server.url + "/predict", ...)

- ``start()`` spawns ``python -m bentoml serve transferkit.service.service:ImageClassifier`` from the project root
  with the settings as ``TRANSFERKIT_*`` variables, in a session of its own (a Ctrl-C in the terminal reaches this
  process, which then stops the server in order), with the parent-death signal set: if this process dies, even by
  SIGKILL, the server gets SIGTERM, drains and exits; its workers follow it (service/lifecycle.py).
- ``wait_ready()`` polls ``/readyz`` (:func:`wait_for_answer`, the one readiness wait); if it fails, times out or is
  interrupted (Ctrl-C), it stops the server before raising, so no server is left holding the port.
- ``stop()`` sends SIGTERM to the arbiter (it drains the entry workers, then the model workers), waits up to the drain
  timeout plus ``SERVER_STOP_GRACE_S`` (service/settings.py), then SIGKILLs the arbiter and every worker it had (by
  pid, pid reuse checked).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Self

from transferkit.core.errors import TransferkitError
from transferkit.core.system import free_port
from transferkit.service.lifecycle import parent_death_signal
from transferkit.service.settings import SERVER_STOP_GRACE_S, env_name, setting_from

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "transferkit.service.service:ImageClassifier"
POLL_S = 0.3  # between readiness probes: quick enough for tests, negligible load on a starting server


class ServerError(TransferkitError):
    """The server exited or never became ready."""

    exit_code = 1
    reason = "server_failed"


def probe(url: str, timeout: float = 3) -> int | None:
    """The HTTP status ``url`` answers a GET with; None when nothing answers (refused, reset, timed out)."""
    import requests

    try:
        return requests.get(url, timeout=timeout).status_code
    except requests.RequestException:
        return None


def wait_for_answer(url: str, timeout: float, *, accept: Callable[[int], bool] = lambda status: status == 200,
                    check: Callable[[], None] = lambda: None, what: str = "ready") -> int:
    """Poll ``url`` until its status is accepted (default: 200), at most ``timeout`` seconds; that status, else
    ServerError.

    The one readiness wait, for every server transferkit starts (the service, the load test's baseline, the tests).
    ``check`` runs before each probe and raises when waiting is pointless (the process has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        check()
        status = probe(url)
        if status is not None and accept(status):
            return status
        if time.monotonic() >= deadline:
            raise ServerError(f"{url} was not {what} after {timeout:.0f} s (last answer: {status or 'none'})")
        time.sleep(POLL_S)


class ServerProcess:
    """A server subprocess on ``host:port`` (a free loopback port by default), and how to start, wait for, stop and
    clean up after it: subclasses say which :meth:`command` runs.

    The server runs in a session of its own (a Ctrl-C in the terminal reaches this process, which then stops the
    server in order) with the parent-death signal set (if this process dies, even by SIGKILL, the server gets
    SIGTERM). ``env``: its whole environment (default: this process's). ``log_path``: where its output goes (None:
    this process's stdout/stderr). ``cwd``: its working directory (default: this process's)."""

    name = "the server"
    ready_path = "/readyz"

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None, die_with_parent: bool = True):
        self.host = host
        self.port = port or free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.url = f"http://{probe_host}:{self.port}"
        self.log_path = log_path
        self.cwd = cwd
        self.die_with_parent = die_with_parent
        self.environment = dict(os.environ if env is None else env)
        self.process: subprocess.Popen | None = None
        self._log: IO | None = None
        self._seen: dict[int, object] = {}  # pid -> psutil.Process of every worker seen, to kill orphans later

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def stop_timeout_s(self) -> float:
        """How long :meth:`stop` waits after SIGTERM before it kills."""
        return 30.0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> Self:
        """Spawn the server (does not wait; see :meth:`wait_ready`)."""
        if self.process is not None:
            raise ServerError("this server was already started")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("w")
        parent = os.getpid()
        self.process = subprocess.Popen(
            self.command(), env=self.environment, cwd=self.cwd, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT if self._log else None, start_new_session=True,
            preexec_fn=(lambda: _die_with_parent(parent)) if self.die_with_parent else None,  # noqa: PLW1509
        )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 180) -> Self:
        """Wait until :attr:`ready_path` answers 200. On failure, timeout or Ctrl-C: stop the server, then raise."""
        try:
            wait_for_answer(self.url + self.ready_path, timeout, check=self._still_starting)
        except ServerError as exc:
            hint = self._log_hint()  # before stop() appends the shutdown to the log
            self.stop()
            raise ServerError(f"{exc}{hint}") from None
        except BaseException:  # KeyboardInterrupt included: never leave a half-started server on the port
            self.stop()
            raise
        return self

    def _still_starting(self) -> None:
        if self.process is None:
            raise ServerError(f"{self.name} was not started")
        if self.process.poll() is not None:
            raise ServerError(f"{self.name} exited with code {self.process.returncode} while starting")
        self.workers()  # remember the workers while they can be found

    def terminate(self) -> None:
        """SIGTERM to the server's main process only: what ``docker stop`` and Kubernetes do."""
        if self.running():
            self.workers()
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the server's main process to exit; its exit code (raises subprocess.TimeoutExpired)."""
        return self.process.wait(timeout)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` (default :attr:`stop_timeout_s`), then SIGKILL the server and every worker
        it had. Returns its exit code (None if it was never started)."""
        if self.process is None:
            return None
        timeout = self.stop_timeout_s if timeout is None else timeout
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
        """SIGKILL every worker seen earlier that still runs (after the main process has gone); their pids."""
        import psutil

        killed = []
        for pid, process in list(self._seen.items()):
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:  # is_running: same create time
                    process.kill()
                    killed.append(pid)
        return killed

    def __enter__(self) -> Self:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def workers(self, service_name: str | None = None) -> list:
        """The server's worker processes (psutil), optionally only those of one BentoML service
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


def _die_with_parent(parent: int) -> None:
    """In the child between fork and exec: SIGTERM when ``parent`` dies, and exit if it already has."""
    if parent_death_signal(parent) == "orphaned":
        os._exit(1)


class BentoServer(ServerProcess):
    """One ``bentoml serve`` of the transferkit service.

    ``model``: a BentoML model tag or a bundle directory. ``settings``: service settings as keyword names
    (``backend="onnx"``, ``max_batch_size=8``) set as ``TRANSFERKIT_<NAME>``. ``env``: extra environment variables.
    """

    name = "bentoml serve"

    def __init__(self, model: str | Path | None, *, host: str = "127.0.0.1", port: int | None = None,
                 log_path: Path | None = None, env: Mapping[str, str] | None = None, service: str = SERVICE,
                 working_dir: Path = PROJECT_ROOT, die_with_parent: bool = True, **settings: object):
        if model is not None:  # the server runs from the project root
            from transferkit.core.repository import absolute_setting

            model = absolute_setting(str(model))
        self.model = None if model is None else str(model)
        self.service = service
        self.working_dir = Path(working_dir)
        environment = {
            **os.environ, "BENTOML_DO_NOT_TRACK": "true",
            **({env_name("model"): self.model} if self.model else {}),
            **{env_name(key): str(value) for key, value in settings.items() if value is not None},
            **(env or {}),
        }
        super().__init__(host=host, port=port, log_path=log_path, env=environment, die_with_parent=die_with_parent)

    @property
    def drain_timeout_s(self) -> float:
        """The drain timeout the server runs with (its environment, as the service reads it)."""
        return float(setting_from(self.environment, "drain_timeout_s"))

    @property
    def stop_timeout_s(self) -> float:
        return self.drain_timeout_s + SERVER_STOP_GRACE_S

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bentoml", "serve", self.service, "--working-dir", str(self.working_dir),
                "--host", self.host, "--port", str(self.port)]


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
                ready = probe(server.url + server.ready_path, timeout=2) == 200
                if ready:
                    on_ready(server)
        server.kill_orphans()
        if not ready and not received and on_ready is not None:
            raise ServerError(f"bentoml serve exited with code {code} before it was ready{server._log_hint()}")
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
