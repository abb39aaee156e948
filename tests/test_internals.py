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
