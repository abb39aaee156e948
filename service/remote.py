"""One model served by a model service of its own (the ``batched`` layout): the entry worker decodes, the model
process (service/service.py's ``ClassifierModel`` for this model) batches and classifies.

Each model has its own model service, so BentoML's adaptive batcher never merges two models' images into one call
and keeps its batching statistics per model (``bentoml_service_adaptive_batch_size{runner_name=...}``, the model
service's name).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from transferkit.core.backends import Choice
from transferkit.core.errors import ModelUnavailable
from transferkit.service.decoding import estimate_all
from transferkit.service.local import Pipeline, read_served_manifest
from transferkit.service.models import not_loaded, reloading

logger = logging.getLogger("transferkit.service")
FOLLOW_S = 2.0  # how stale the entry's view of a polled model's version may get while requests flow


class RemoteModel:
    """The routes' view (service/http.py's ``Entry``) of a model whose process answers through ``client()``: the
    BentoML dependency of the entry on that model's service (resolved at the first call)."""

    def __init__(self, name: str, bundle_path: Callable[[], Any], choice: Choice, client: Callable[[], Any],
                 pipeline: Pipeline, find_version: Callable[[str], Any] | None = None,
                 on_version: Callable[[str, str, str], None] | None = None):
        self.name, self.choice, self.backend = name, choice, choice.backend
        self.manifest, self.load_error = read_served_manifest(bundle_path)
        self.client, self.pipeline = client, pipeline
        # A repository model's version -> its manifest: how the entry reads the version a model process swapped in.
        self.find_version, self.on_version = find_version, on_version or (lambda name, old, new: None)
        self._followed_at, self._following = 0.0, None

    def is_ready(self) -> bool:
        return self.manifest is not None  # BentoML asks the model service itself before /readyz answers 200

    @property
    def error(self) -> str | None:
        return self.load_error

    async def _decode(self, images: list[tuple[str, bytes]]) -> np.ndarray:
        side, max_pixels = self.manifest.image_size, self.pipeline.max_pixels
        async with self.pipeline.gate.admit(estimate_all(images, side, max_pixels), self.pipeline.decode_wait_s):
            # Decoding is CPU work: off the event loop, so that probes and other requests stay responsive.
            return await asyncio.to_thread(self.pipeline.decode_all, images, side, max_pixels)

    async def infer_encoded(self, images: list[tuple[str, bytes]]) -> np.ndarray:
        return await self.infer_pixels(await self._decode(images))

    async def infer_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return await self._call(classify_retrying, pixels)

    async def explain_encoded(self, images: list[tuple[str, bytes]]) -> tuple:
        pixels = await self._decode(images)
        return (*await self.explain_pixels(pixels), pixels)

    async def explain_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        joined = await self._call(lambda model, batch: model.to_async.explain(batch), pixels)
        classes = len(self.manifest.class_names)
        height, width = self.manifest.explain.resolution
        return joined[:, :classes], joined[:, classes:].reshape(-1, height, width)

    async def _call(self, call, pixels: np.ndarray, again: bool = True) -> np.ndarray:
        from bentoml.exceptions import BentoMLException

        started = time.monotonic()
        try:
            answer = np.asarray(await call(self.client(), pixels))
            self._follow_soon()
            return answer
        except BentoMLException as exc:
            status = int(getattr(getattr(exc, "error_code", None), "value", 500))
            if status not in (429, 503, 504):
                raise
        info = await self.describe()  # why the model refused: loading, failed or busy (BentoML masks 5xx messages)
        state = info.get("state")
        if state == "unloaded":
            raise not_loaded(self.name, info.get("reason", ""))
        if state == "reloading":
            raise reloading(self.name, max(1, round(info.get("retry_s") or 2)))
        if state == "failed":
            raise ModelUnavailable("model_unavailable", f"the model failed to load: {info.get('error')}", None)
        if state == "loading":
            raise ModelUnavailable("warming_up", "the model is still loading and warming up; retry shortly", 2)
        if state == "ready" and again and status == 503 and \
                info.get("ready_for_s", float("inf")) < time.monotonic() - started:
            return await self._call(call, pixels, again=False)  # refused while (re)loading, ready since: once more
        raise ModelUnavailable("overloaded", "the model is busy and cannot answer within its latency budget; "
                                             "retry with backoff", 1)

    async def describe(self) -> dict:
        try:
            info = await self.client().to_async.describe()
        except Exception as exc:  # the model process is still starting
            return {"state": "loading", "error": type(exc).__name__}
        self._follow(info.get("version"))
        return info

    def _follow(self, version: str | None) -> None:
        """The model process swapped in ``version`` (it polls its repository folder): take that version's manifest
        for /metadata and the protocol's ``model_version`` (its input size and classes are the serving one's: the
        model process refuses others, service/models.py's ``same_interface``)."""
        self._followed_at = time.monotonic()
        if not version or self.manifest is None or version == self.manifest.version or self.find_version is None:
            return
        manifest = self.find_version(version)
        if manifest is not None:
            old, self.manifest = self.manifest.version, manifest
            self.on_version(self.name, old, version)

    def _follow_soon(self) -> None:
        """Ask the model process which version it serves, at most every :data:`FOLLOW_S`, off the request's path."""
        if self.find_version is None or time.monotonic() - self._followed_at < FOLLOW_S:
            return
        if self._following is None or self._following.done():
            self._followed_at = time.monotonic()
            self._following = asyncio.get_running_loop().create_task(self.describe())


def _dropped_connection(exc: Exception) -> bool:
    import aiohttp

    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError)):
        return True
    return isinstance(exc, RuntimeError) and ("Connection closed" in str(exc) or "Session is closed" in str(exc))


async def classify_retrying(model: Any, pixels: np.ndarray, attempts: int = 3) -> np.ndarray:
    """Call the model process, retrying when the pooled keep-alive connection was closed under us.

    BentoML's inter-service client keeps connections longer than uvicorn's 5 s keep-alive, so a reused connection
    can be closed by the server mid-request (bentoml/BentoML#4971). Inference is idempotent and the failure is the
    connection's, not the request's, so a retry is safe.
    """
    for attempt in range(attempts):
        try:
            return await model.to_async.classify(pixels)
        except Exception as exc:
            if attempt == attempts - 1 or not _dropped_connection(exc):
                raise
            logger.warning(
                "transferkit: connection to the model process dropped (%s); retrying", type(exc).__name__)
    raise AssertionError("unreachable")
