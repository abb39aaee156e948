"""Every private BentoML, circus and uvicorn symbol the service relies on, named in one place.

service/lifecycle.py and service/service.py patch or read internals of these libraries (the drain on SIGTERM, the
ordered stop, tracing's default, the worker index). pyproject.toml pins BentoML to the exact version they were
checked against; after an upgrade, this file says in one place what moved, before a server misbehaves.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _source(cls) -> str:
    return inspect.getsource(cls)


def test_the_installed_bentoml_is_the_pinned_one():
    pins = re.findall(r'"bentoml==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    for target in ("cpu", "gpu"):
        requirements = (ROOT / "service" / f"requirements-{target}.txt").read_text()
        pins += re.findall(r"^bentoml==([\d.]+)", requirements, re.MULTILINE)
    assert pins == [version("bentoml")] * 3, (
        f"pyproject.toml pins bentoml {pins}, {version('bentoml')} is installed: check every symbol below against "
        "the new version, then move the pin")


@pytest.mark.parametrize("module,name,needs", [
    # service/service.py: tracing costs nothing unless an exporter is configured
    ("bentoml._internal.configuration.containers", "BentoMLContainer", ["tracing"]),
    # service/service.py and lifecycle.py: which worker this is
    ("bentoml._internal.context", "server_context", ["worker_index"]),
    # lifecycle.py: the ordered stop of `bentoml serve`'s arbiter
    ("bentoml._internal.utils.circus", "Arbiter", ["stop", "start"]),
    # lifecycle.py: the drain before uvicorn stops serving
    ("uvicorn.server", "Server", ["handle_exit"]),
    # connections.py: the head deadline mixed into uvicorn's HTTP protocols
    ("uvicorn.protocols.http.h11_impl", "H11Protocol", ["connection_made", "data_received", "connection_lost",
                                                        "on_response_complete", "send_400_response"]),
    ("uvicorn.protocols.http.h11_impl", "RequestResponseCycle", ["send"]),
    # guard.py: the routes of BentoML's app, walked into the fixed set of paths
    ("_bentoml_impl.server.mount", "PassiveMount", ["matches"]),
    # openapi.py: the transferkit routes added to the document BentoML serves at /docs.json
    ("_bentoml_sdk.service.openapi", "generate_spec", ["__call__"]),
])
def test_private_symbols_the_service_uses_exist(module, name, needs):
    import importlib

    target = getattr(importlib.import_module(module), name)
    for attribute in needs:
        assert hasattr(target, attribute), f"{module}.{name}.{attribute} is gone"


def test_attributes_the_patches_read_and_write_are_still_set_by_the_libraries():
    import circus.arbiter
    import circus.sockets
    import circus.watcher
    import uvicorn.server

    arbiter = _source(circus.arbiter.Arbiter)
    for attribute in ("self._stopping", "self._exclusive_running_command", "self.sockets", "self.watchers"):
        assert attribute in arbiter, f"circus' Arbiter no longer sets {attribute}"
    watcher = _source(circus.watcher.Watcher)
    for attribute in ("self.respawn", "self.graceful_timeout", "def _stop("):
        assert attribute in watcher, f"circus' Watcher no longer has {attribute}"
    assert "is_unix" in _source(circus.sockets.CircusSocket)
    assert "self.force_exit" in _source(uvicorn.server.Server)


def test_the_worker_entry_point_the_lifecycle_recognises_exists():
    import _bentoml_impl

    # lifecycle.process_role tells a worker by its argv[0]: _bentoml_impl/worker/service.py
    assert (Path(_bentoml_impl.__file__).parent / "worker" / "service.py").is_file()


def test_what_the_connection_guard_relies_on_in_uvicorn_and_bentoml():
    """service/connections.py replaces uvicorn's protocol and wraps the app through ``uvicorn.Config``'s arguments,
    for the config BentoML's worker builds; service/guard.py exists because BentoML's metrics label the raw path."""
    import _bentoml_impl.worker.service as worker
    import bentoml._internal.server.http.instruments as instruments
    import uvicorn.config
    import uvicorn.protocols.http.h11_impl as h11_impl
    from _bentoml_impl.server.mount import PassiveMount
    from starlette.routing import Mount

    parameters = inspect.signature(uvicorn.config.Config.__init__).parameters
    assert {"app", "http", "h11_max_incomplete_event_size"} <= set(parameters)
    assert {"auto", "h11", "httptools"} <= set(uvicorn.config.HTTP_PROTOCOLS)
    worker_source = inspect.getsource(worker)
    assert "uvicorn.Config(" in worker_source and "http=" not in worker_source  # BentoML leaves `http` at auto
    assert 'server_context.service_type = "entry_service"' in worker_source
    protocol, cycle = _source(h11_impl.H11Protocol), _source(h11_impl.RequestResponseCycle)
    for attribute in ("self.cycle", "self.transport", "self.loop", "self.conn = h11.Connection"):
        assert attribute in protocol, f"uvicorn's H11Protocol no longer sets {attribute}"
    for attribute in ("self.response_complete", "self.more_body"):
        assert attribute in cycle, f"uvicorn's RequestResponseCycle no longer sets {attribute}"
    assert 'endpoint = scope["path"]' in _source(instruments.RunnerTrafficMetricsMiddleware)
    assert issubclass(PassiveMount, Mount)


def test_a_file_runs_whole_on_one_worker(request):
    """The suite's own reliance on an internal: pytest-xdist's ``--dist loadgroup`` keeps a file on one worker (so
    that its module fixtures, servers and trained runs, are built once) by appending ``@group`` to each node id, which
    it can only do where pytest still reads ``item._nodeid`` (not in pytest 9.2: pyproject.toml caps it)."""
    import os

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("not under pytest-xdist (the README's command always is)")
    assert request.node.nodeid.endswith("@test_internals.py"), request.node.nodeid
