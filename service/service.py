"""The BentoML service: ``bentoml serve`` (bentofile.yaml names ``transferkit.service.service:ImageClassifier``).

Two services, BentoML's model-composition pattern for adaptive batching:

- ``ImageClassifier`` (the HTTP entry point) parses each request, decodes and validates every image with the same
  guarded function training used, and only then sends the request's pixels to the model. A bad image fails its own
  request with a 4xx; it never reaches a batch. It serves ``POST /predict`` and ``GET /metadata``.
- ``ClassifierModel`` holds the bundle (verified against its sha256 manifest, loaded, warmed at every batch size it
  will see) and exposes one batchable API; BentoML's adaptive batcher merges concurrent requests into one model call.

TensorFlow is imported only by the ``savedmodel`` backend, inside the model process. Settings: service/settings.py.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from transferkit.core.errors import TransferkitError
from transferkit.service.http import build_app, metrics
from transferkit.service.middleware import BodySizeLimit
from transferkit.service.settings import ServiceSettings

logger = logging.getLogger("transferkit.service")
SETTINGS = ServiceSettings.from_env()
STORE_LABEL = "transferkit-bundle"


def _store_model(settings: ServiceSettings) -> bentoml.models.BentoModel | None:
    """The model-store reference, so that ``bentoml build`` packs the bundle; None for a bundle directory."""
    if settings.model and (Path(settings.model).is_dir() or "/" in settings.model):
        return None
    if settings.model:
        return bentoml.models.BentoModel(settings.model)
    # Not configured: inside a built bento (or a store with a single bundle) the choice is unambiguous.
    candidates = sorted({m.tag.name for m in bentoml.models.list() if m.info.labels.get("stage") == STORE_LABEL})
    if len(candidates) == 1:
        return bentoml.models.BentoModel(f"{candidates[0]}:latest")
    logger.error("TRANSFERKIT_MODEL is not set and the model store holds %s transferkit bundles (%s); set it to a "
                 "model tag or a bundle directory", len(candidates), ", ".join(candidates) or "none")
    return None


MODEL = _store_model(SETTINGS)


def _bundle_path() -> Path:
    if MODEL is not None:
        try:
            return Path(MODEL.stored.path)
        except Exception as exc:  # bentoml's NotFound and friends
            raise TransferkitError(f"BentoML model {SETTINGS.model or MODEL} is not in the model store "
                                   f"({type(exc).__name__}); see `bentoml models list`") from None
    if SETTINGS.model:
        return Path(SETTINGS.model)
    raise TransferkitError("no model configured: set TRANSFERKIT_MODEL to a BentoML model tag or a bundle directory")


def warmup_sizes(max_batch_size: int) -> list[int]:
    """Every batch size the batcher can form would be a new input shape for CUDA; on CPU powers of two suffice."""
    sizes = {1, max_batch_size}
    size = 2
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


@bentoml.service(
    name="transferkit-model",
    resources=SETTINGS.resources(),
    workers=SETTINGS.model_workers,  # one model copy per process (settings.py says why several on CPU)
    traffic={"timeout": SETTINGS.timeout_s},
    # The entry service logs every client request; a second line per internal hop is noise and CPU.
    logging={"access": {"enabled": False}},
)
class ClassifierModel:
    bundle = MODEL

    def __init__(self) -> None:
        self.ready = False
        self.settled = threading.Event()  # set once loading has succeeded or failed
        self.error: str | None = None
        self.description: dict[str, Any] = {"state": "loading"}
        # Load in the background: /livez answers at once, /readyz turns 200 only once the model is warm.
        threading.Thread(target=self._load, name="load-bundle", daemon=True).start()

    def _load(self) -> None:
        from transferkit.export.predictors import load_bundle

        start = time.perf_counter()
        try:
            bundle = load_bundle(_bundle_path())  # refuses a tampered or truncated file
            predictor = bundle.predictor(SETTINGS.backend, SETTINGS.device, SETTINGS.threads, spin=False)
            size = bundle.manifest.image_size
            for batch in warmup_sizes(SETTINGS.max_batch_size):
                probabilities = predictor(np.zeros((batch, size, size, 3), np.float32))
                if not np.isfinite(probabilities).all():
                    raise TransferkitError(f"the {SETTINGS.backend} model returns non-finite probabilities")
        except Exception as exc:  # any failure must keep the service unready, with the reason in the log
            self.error = str(exc) if isinstance(exc, TransferkitError) else f"{type(exc).__name__}: {exc}"
            self.description = {"state": "failed", "error": self.error}
            logger.error("transferkit: refusing to serve: %s", self.error)
            self.settled.set()
            return
        self.predictor = predictor
        self.description = {
            "state": "ready", "bundle": str(bundle.path), "backend": SETTINGS.backend,
            "provider": predictor.provider, "model_workers": SETTINGS.model_workers,
            "threads_per_worker": getattr(predictor, "threads", None),
            "cuda": getattr(predictor, "cuda_note", "n/a") or "loaded",
            "warmup_batch_sizes": warmup_sizes(SETTINGS.max_batch_size),
            "load_seconds": round(time.perf_counter() - start, 2),
        }
        self.ready = True
        self.settled.set()
        logger.info("transferkit: serving %s %s with %s on %s (%.1fs to verify, load and warm)",
                    bundle.manifest.name, bundle.manifest.version, SETTINGS.backend, predictor.provider,
                    time.perf_counter() - start)

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB [N, H, W, 3] -> float32 probabilities [N, C]; never raises for one bad row."""
        # With several model processes one may still be warming when another already answers /readyz: wait for
        # it rather than bounce the batch (a failed load answers at once).
        if not self.ready and not self.settled.wait(SETTINGS.timeout_s):
            raise bentoml.exceptions.ServiceUnavailable("model not ready: still loading")
        if not self.ready:
            raise bentoml.exceptions.ServiceUnavailable(f"model not ready: {self.error}")
        return self.predictor(pixels.astype(np.float32))

    @bentoml.api
    def describe(self) -> dict:
        return self.description


@bentoml.asgi_app(build_app(lambda: bentoml.get_current_service(), SETTINGS), path="/")
@bentoml.service(
    name="transferkit",
    workers=1,
    traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": SETTINGS.max_concurrency},
)
class ImageClassifier:
    model = bentoml.depends(ClassifierModel)
    bundle = MODEL

    def __init__(self) -> None:
        from transferkit.core.manifest import read_manifest

        self.manifest = None
        self.settings = SETTINGS
        try:
            self.manifest = read_manifest(_bundle_path())
        except TransferkitError as exc:
            logger.error("transferkit: refusing to serve: %s", exc)

    def __is_ready__(self) -> bool:
        return self.manifest is not None  # BentoML also asks ClassifierModel (its dependency) before answering 200


ImageClassifier.add_asgi_middleware(
    BodySizeLimit, max_bytes=SETTINGS.max_body_bytes, on_reject=lambda: metrics.rejected("body_too_large"),
)
