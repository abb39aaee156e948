"""A real ``bentoml serve`` of the transferkit service for tests: transferkit's own launcher plus HTTP shortcuts."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from transferkit.service.launcher import PROJECT_ROOT, BentoServer, ServerError, wait_for_answer

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
        """Wait until ``/livez`` answers at all (ready or not): the launcher's readiness wait, any status accepted."""
        try:
            wait_for_answer(self.url + "/livez", timeout, accept=lambda status: True, check=self._still_starting,
                            what="listening")
        except ServerError as exc:
            raise ServerError(f"{exc}:\n{self.log()[-4000:]}") from None


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


class InProcessService:
    """What the routes take from the running entry service (service/service.py), for an in-process app: the models,
    by name (service/models.py), the first the default unless ``default`` says otherwise (None: no default)."""

    def __init__(self, *entries, default: str | None = "first"):
        from transferkit.service.models import ModelSet

        self.models = ModelSet({entry.name: entry for entry in entries},
                               (entries[0].name if entries else None) if default == "first" else default)

    def is_ready(self) -> bool:
        return all(entry.is_ready() for _, entry in self.models)


def local_model(bundle: Path, name: str | None = None, backend: str = "onnx", wait: bool = True):
    """The ``inprocess`` layout's model over a real bundle (service/local.py), loaded and warm (``wait``; else
    loading in the background), its decode and inference durations observed on the service's metrics."""
    from transferkit.core.backends import Choice
    from transferkit.service.decoding import DecodeGate, decode_all
    from transferkit.service.http import metrics
    from transferkit.service.local import LocalModel, Pipeline

    pipeline = Pipeline(metrics.timed("decode", decode_all), DecodeGate(2, 1024 * 2**20), 50_000_000, 5.0, 15.0)
    from transferkit.core.manifest import read_manifest

    model = LocalModel.open(name or read_manifest(bundle).name, lambda: bundle, Choice(backend, "test"), pipeline,
                            device="auto", threads=1, batch_sizes=[1], observe=metrics.observe)
    if wait:
        assert model.runtime.settled.wait(120) and model.runtime.ready, model.runtime.error
    return model
