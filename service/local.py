"""One model served inside an HTTP worker (the ``inprocess`` and ``microbatch`` layouts): its manifest, its backend,
its :class:`~transferkit.service.runtime.ModelRuntime`, and the request pipeline (decode, then classify or explain
on the runtime's compute threads). A worker holds one per model it serves (service/service.py); they share the
worker's decode gate, so that decode memory stays bounded per worker however many models it serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from transferkit.core.backends import Choice
from transferkit.core.errors import TransferkitError
from transferkit.service.decoding import DecodeGate, estimate_all
from transferkit.service.errors import mask_paths
from transferkit.service.runtime import ModelRuntime


@dataclass(frozen=True)
class Pipeline:
    """What every model of a worker shares: the decoder (observed on /metrics), the decode gate and its waits."""

    decode_all: Callable[..., np.ndarray]
    gate: DecodeGate
    max_pixels: int
    warming_wait_s: float
    decode_wait_s: float


def read_served_manifest(bundle_path: Callable[[], Any]) -> tuple[Any, str | None]:
    """The manifest of the bundle ``bundle_path()`` names and None, or None and why it cannot be read (paths masked:
    the reason is shown to clients)."""
    from transferkit.core.manifest import read_manifest

    try:
        return read_manifest(bundle_path()), None
    except TransferkitError as exc:
        return None, mask_paths(str(exc))


class LocalModel:
    """The routes' view of one model (service/http.py's ``Entry``): ``manifest`` (None when it could not be read,
    with ``load_error``), ``backend`` and ``choice``, and the async request methods."""

    def __init__(self, name: str, manifest: Any, load_error: str | None, choice: Choice, runtime: ModelRuntime,
                 pipeline: Pipeline, worker: int | None = None):
        self.name, self.manifest, self.load_error, self.choice = name, manifest, load_error, choice
        self.backend = choice.backend
        self.runtime, self.pipeline, self.worker = runtime, pipeline, worker

    @classmethod
    def open(cls, name: str, bundle_path: Callable[[], Any], choice: Choice, pipeline: Pipeline,
             worker: int | None = None, **runtime_options: Any) -> LocalModel:
        """Read the manifest now (a refusal is kept as ``load_error``) and start loading the model in the background."""
        manifest, error = read_served_manifest(bundle_path)
        return cls(name, manifest, error, choice, ModelRuntime(bundle_path, choice.backend, **runtime_options),
                   pipeline, worker)

    def is_ready(self) -> bool:
        return self.manifest is not None and self.runtime.ready

    @property
    def error(self) -> str | None:
        """Why this version cannot answer (its bundle unreadable, or its load failed), else None."""
        return self.load_error or (self.runtime.error if self.runtime.state == "failed" else None)

    def _decode(self, images: list[tuple[str, bytes]]) -> np.ndarray:
        return self.pipeline.decode_all(images, self.manifest.image_size, self.pipeline.max_pixels)

    def _decode_and_predict(self, images: list[tuple[str, bytes]]) -> np.ndarray:
        return self.runtime.predict(self._decode(images))

    def _decode_and_explain(self, images: list[tuple[str, bytes]]) -> tuple:
        pixels = self._decode(images)
        return (*self.runtime.explain(pixels), pixels)

    async def _admitted(self, images: list[tuple[str, bytes]]) -> tuple[float, Any]:
        cost = estimate_all(images, self.manifest.image_size, self.pipeline.max_pixels)
        await self.runtime.wait_ready(self.pipeline.warming_wait_s)
        return time.perf_counter(), self.pipeline.gate.admit(cost, self.pipeline.decode_wait_s)

    async def infer_encoded(self, images: list[tuple[str, bytes]]) -> np.ndarray:
        arrived, admission = await self._admitted(images)  # its queue time: for a decode slot, then a thread
        async with admission:
            if self.runtime.batcher is None:
                # Decode and inference as one job on this worker's compute thread(s): a request never waits
                # behind another request's decode between its own decode and its inference.
                return await self.runtime.run(self._decode_and_predict, images, since=arrived)
            pixels = await self.runtime.run(self._decode, images)
        return await self.runtime.predict_batched(pixels)

    async def infer_pixels(self, pixels: np.ndarray) -> np.ndarray:
        await self.runtime.wait_ready(self.pipeline.warming_wait_s)
        if self.runtime.batcher is not None:
            return await self.runtime.predict_batched(pixels)
        return await self.runtime.run(self.runtime.predict, pixels)

    async def explain_encoded(self, images: list[tuple[str, bytes]]) -> tuple:
        arrived, admission = await self._admitted(images)
        async with admission:
            return await self.runtime.run(self._decode_and_explain, images, since=arrived)

    async def explain_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        await self.runtime.wait_ready(self.pipeline.warming_wait_s)
        return await self.runtime.run(self.runtime.explain, pixels)

    async def describe(self) -> dict:
        return {**self.runtime.describe(), **({"worker": self.worker} if self.worker else {})}
