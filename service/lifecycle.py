"""Process lifecycle of a ``bentoml serve`` of transferkit: drain on SIGTERM, stop in order, never outlive the arbiter.

How BentoML 1.4 stops (read from its source, with circus 0.19 and uvicorn 0.3x+):

- ``bentoml serve`` is a circus *arbiter*. It imports the service module (to build its watchers), then starts one
  watcher per service: ``service`` (the HTTP entry workers) and ``service_<name>`` per dependency (model workers).
  Each worker runs ``python -m _bentoml_impl.worker.service`` in a session of its own (circus calls ``setsid``), so
  a signal to the arbiter's process group never reaches a worker.
- On SIGTERM/SIGINT the arbiter's ``stop`` first deletes the unix-socket directory of the internal services, then
  sends SIGTERM to *every* worker of every watcher at once, and waits up to ``graceful_timeout`` (86400 s) before
  SIGKILL. An entry with requests in flight therefore loses its model service mid-request: the "Cannot connect to
  unix socket" 500s of issue 16.
- In a worker, ``uvicorn.Server.serve`` replaces the SIGTERM/SIGINT handlers with its own ``handle_exit`` (so a
  handler installed at import time would be overwritten). ``handle_exit`` sets ``should_exit``; within 0.1 s uvicorn
  stops accepting, closes idle keep-alive connections, waits for running requests (no limit by default) and runs the
  lifespan shutdown.
- If the arbiter is SIGKILLed, nobody stops the workers: they keep the listening socket and go on answering.

What :func:`install_worker_lifecycle` changes (it is called once when the service module is imported; it does
nothing in processes that are neither a worker nor a ``bentoml serve`` arbiter, e.g. ``bentoml build`` or pytest):

- **Worker**: sets the Linux parent-death signal to SIGTERM, so a worker drains and exits when its arbiter dies, and
  exits at once if the arbiter died before that (checked against the arbiter's pid, exported by the arbiter).
  Closes the listening sockets it inherited from circus but does not serve (a model worker held the public port).
  Wraps uvicorn's ``handle_exit``: the first SIGTERM sets the draining flag at once (:func:`is_draining`: ``/readyz``
  answers 503, new work answers 503 ``shutting_down``) while the worker keeps accepting; uvicorn's own graceful
  shutdown starts when the requests counted by :func:`track_request` have finished, or when the drain timeout has
  passed. A watchdog exits the process if even that hangs.
- **Arbiter**: stops the entry watcher first and the model watchers only once every entry worker has exited (so the
  model service and its socket outlive every request the entry accepted), and bounds each watcher's graceful stop by
  the drain timeout instead of 86400 s. It also restores circus's respawning of dead workers inside containers:
  BentoML turns it off when ``BENTOML_CONTAINERIZED`` is set (its Dockerfiles set it), and then nothing replaces a
  crashed or OOM-killed worker while ``/livez`` stays 200, so an orchestrator never restarts the stuck container.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

from transferkit.service.settings import DEFAULT_DRAIN_TIMEOUT_S, WORKER_EXIT_GRACE_S, setting_from

logger = logging.getLogger("transferkit.service.lifecycle")

ARBITER_PID_ENV = "TRANSFERKIT_ARBITER_PID"  # set by the arbiter for its workers: the parent they must outlive not
ENTRY_WATCHER = "service"  # BentoML's name for the HTTP entry watcher; dependencies are "service_<name>"
API_SOCKET = "_bento_api_server"  # BentoML's name for the public listening socket
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_draining = threading.Event()
_lock = threading.Lock()
_in_flight = 0
_installed: str | None = None
_drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S


def _libc_prctl() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once, at import: the launcher calls parent_death_signal between fork and exec, where a dlopen() can
# deadlock if another thread held the loader's lock at the fork.
_PRCTL = _libc_prctl()


def is_draining() -> bool:
    """True from the first SIGTERM on: the process is finishing what it accepted and will exit."""
    return _draining.is_set()


def in_flight() -> int:
    """Requests inside :func:`track_request` right now."""
    return _in_flight


@contextlib.contextmanager
def track_request() -> Iterator[None]:
    """Count a request as in flight for its duration, so that a SIGTERM waits for it (usable in sync and async
    code: entering and leaving never block)."""
    global _in_flight
    with _lock:
        _in_flight += 1
    try:
        yield
    finally:
        with _lock:
            _in_flight -= 1


def drain_timeout_s() -> float:
    """Seconds a SIGTERMed process waits for its requests before it stops anyway."""
    return _drain_timeout_s


def wait_drained(timeout: float) -> bool:
    """Wait until no request is in flight, at most ``timeout`` seconds; True if drained."""
    deadline = time.monotonic() + timeout
    while _in_flight > 0:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def process_role() -> str | None:
    """``"worker"`` in a BentoML worker process, ``"arbiter"`` in ``bentoml serve``, else None."""
    main = sys.argv[0] if sys.argv else ""
    if main.replace(os.sep, "/").endswith("_bentoml_impl/worker/service.py"):
        return "worker"
    with contextlib.suppress(Exception):  # bentoml internals moved: fall back to argv only
        from bentoml._internal.context import server_context

        if server_context.worker_index is not None:
            return "worker"
    name = os.path.basename(main)
    if (name == "bentoml" or main.replace(os.sep, "/").endswith("bentoml/__main__.py")) and "serve" in sys.argv[1:2]:
        return "arbiter"
    return None


def install_worker_lifecycle(drain_timeout_s: float | None = None) -> str | None:
    """Install the lifecycle for this process's role (see the module docstring); idempotent.

    ``drain_timeout_s``: the service setting; None reads ``TRANSFERKIT_DRAIN_TIMEOUT_S`` (default 30 s).
    Returns the role it installed for, or None.
    """
    global _installed, _drain_timeout_s
    if _installed is not None:
        return _installed
    if drain_timeout_s is None:
        drain_timeout_s = setting_from(os.environ, "drain_timeout_s")
    _drain_timeout_s = float(drain_timeout_s)
    role = process_role()
    if role is not None:
        logger.setLevel(logging.INFO)  # BentoML leaves the root logger at WARNING: show the drain to operators
    if role == "worker":
        _die_with_arbiter()
        close_foreign_listeners()
        _wrap_uvicorn_exit()
    elif role == "arbiter":
        os.environ[ARBITER_PID_ENV] = str(os.getpid())  # circus copies the environment into every worker
        _order_arbiter_stop()
    _installed = role
    return role


# ---------------------------------------------------------------------------------------------------------- worker


def _expected_parent() -> int | None:
    raw = os.environ.get(ARBITER_PID_ENV, "")
    return int(raw) if raw.isdigit() else None


def parent_death_signal(expected_parent: int | None, sig: int = signal.SIGTERM) -> str:
    """Ask Linux to send ``sig`` to this process when its parent dies: ``"set"``, ``"unsupported"`` (not Linux, or
    prctl failed) or ``"orphaned"``: the parent had already died (``getppid()`` no longer is ``expected_parent``:
    the process was re-parented to init or a subreaper), which the request cannot cover; the caller should exit.

    The one place PR_SET_PDEATHSIG is set, for the launcher's server (called between fork and exec, so it allocates
    nothing, logs nothing and never exits) and for every worker of that server (:func:`install_worker_lifecycle`).
    """
    if _PRCTL is None or _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return "unsupported"
    # After prctl: a parent dying from here on signals us; one that died before shows as a changed parent pid.
    if expected_parent is not None and os.getppid() != expected_parent:
        return "orphaned"
    return "set"


def _die_with_arbiter() -> None:
    """A worker drains and exits when its arbiter dies, and exits now if the arbiter is already gone."""
    arbiter = _expected_parent()
    outcome = parent_death_signal(arbiter)
    if outcome == "unsupported":
        logger.warning("transferkit: cannot set the parent-death signal (%s); this worker may outlive its arbiter",
                       os.strerror(ctypes.get_errno()) if _PRCTL is not None else "not Linux")
    elif outcome == "orphaned":
        logger.error("transferkit: the arbiter (pid %s) is gone; this worker exits", arbiter)
        os._exit(0)


def close_foreign_listeners() -> list[int]:
    """Close the listening sockets this worker inherited but does not serve; their descriptors.

    circus hands every socket of the arbiter to every worker. A model worker would otherwise hold the public port
    open until it exits, so the kernel would go on accepting connections that no HTTP worker will ever answer.
    The worker's own socket is the ``--fd`` on its command line.
    """
    argv = sys.argv
    if "--fd" not in argv[:-1] or not argv[argv.index("--fd") + 1].isdigit():
        return []
    own = int(argv[argv.index("--fd") + 1])
    closed = []
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        fd = int(name)
        if fd == own or fd < 3:
            continue
        try:
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:  # not a socket
            continue
        try:
            listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        except OSError:
            listening = False
        finally:
            probe.close()
        if listening:
            os.close(fd)
            closed.append(fd)
    return closed


def _wrap_uvicorn_exit() -> None:
    """Make uvicorn's SIGTERM handler drain first (see the module docstring)."""
    try:
        from uvicorn.server import Server
    except ImportError:  # not an ASGI worker: the default SIGTERM behaviour stays
        return
    original: Callable = Server.handle_exit
    if getattr(original, "_transferkit_drain", False):
        return

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not _draining.is_set():
            _begin_drain(lambda: original(self, sig, frame), lambda: setattr(self, "force_exit", True))
            return
        original(self, sig, frame)  # a second signal, or SIGINT: uvicorn's own behaviour (SIGINT twice forces)

    handle_exit._transferkit_drain = True  # type: ignore[attr-defined]
    Server.handle_exit = handle_exit


def _begin_drain(stop_serving: Callable[[], None], force: Callable[[], None]) -> None:
    """Set the draining flag now; stop serving once drained (or at the deadline); force the exit if that hangs."""
    _draining.set()
    timeout = _drain_timeout_s
    deadline = time.monotonic() + timeout
    logger.info("transferkit: SIGTERM, draining %d request(s) in flight (up to %.0f s)", _in_flight, timeout)

    def drain() -> None:
        if not wait_drained(timeout):
            logger.warning("transferkit: drain timeout (%.0f s) passed with %d request(s) in flight",
                           timeout, _in_flight)
        stop_serving()  # uvicorn: stop accepting, finish open connections, lifespan shutdown, exit
        # uvicorn waits for open connections without limit: bound it by the drain deadline, then hard.
        time.sleep(max(0.0, deadline - time.monotonic()))
        force()
        time.sleep(WORKER_EXIT_GRACE_S)
        logger.error("transferkit: worker did not stop %.0f s after the drain timeout; exiting", WORKER_EXIT_GRACE_S)
        os._exit(1)

    threading.Thread(target=drain, name="transferkit-drain", daemon=True).start()


# --------------------------------------------------------------------------------------------------------- arbiter


def _order_arbiter_stop() -> None:
    """Patch BentoML's circus arbiter: ``stop`` drains the entry watcher before anything else; ``start`` lets
    circus respawn dead workers in containers too."""
    try:
        from bentoml._internal.utils.circus import Arbiter
        from tornado import gen
    except ImportError:
        logger.warning("transferkit: cannot order the shutdown (BentoML's arbiter moved); workers stop together")
        return
    original = Arbiter.stop
    if getattr(original, "_transferkit_ordered", False):
        return
    bound = _drain_timeout_s + WORKER_EXIT_GRACE_S
    original_start = Arbiter.start

    def start(self, *args, **kwargs):
        for watcher in self.watchers:
            watcher.respawn = True
        return original_start(self, *args, **kwargs)

    @gen.coroutine
    def stop(self):
        if getattr(self, "_transferkit_stopping", False):  # a second SIGTERM/SIGINT: the first stop goes on
            return
        self._transferkit_stopping = True
        # No respawning from here on: a stopping entry worker must not come back.
        self._stopping = True
        for watcher in self.watchers:
            watcher.graceful_timeout = min(watcher.graceful_timeout, bound)
        # The arbiter's copy of the listening TCP socket would keep the kernel accepting connections after every
        # HTTP worker has closed its own; nobody would answer them. Closed here, the socket closes with the last
        # worker, and later clients are refused at once instead of being accepted and then dropped.
        api = getattr(self, "sockets", {}).get(API_SOCKET)
        if api is not None and not api.is_unix:
            api.close()
        entry = [w for w in self.watchers if w.name == ENTRY_WATCHER]
        if entry and len(entry) < len(self.watchers):  # something to order: dependencies exist
            logger.info("transferkit: stopping the entry workers first (drain up to %.0f s)", _drain_timeout_s)
            yield gen.multi([w._stop() for w in entry])
        # circus refuses a command while another one (a periodic manage_watchers) still runs
        waited = 0.0
        while self._exclusive_running_command is not None and waited < 10:
            yield gen.sleep(0.05)
            waited += 0.05
        yield original(self)

    stop._transferkit_ordered = True  # type: ignore[attr-defined]
    Arbiter.stop = stop
    Arbiter.start = start
