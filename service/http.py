"""The HTTP endpoints of the image service, as a Starlette app mounted into the BentoML entry service.

Why not a ``@bentoml.api`` taking ``list[Path]``: BentoML's multipart parser turns a *text* value in a file field into
a URL and downloads it, and its image types trust the part's Content-Type. Here every part is checked to be a real
file upload, read into memory (the body is already capped by :mod:`transferkit.service.middleware`), and decoded
from its bytes alone by :func:`transferkit.core.images.decode_image` in a worker thread, so one bad image fails only
its request, with a 4xx saying what was expected, before anything is batched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from transferkit.core.errors import InvalidImageError
from transferkit.core.images import decode_image
from transferkit.service.settings import ServiceSettings

logger = logging.getLogger("transferkit.service")
FIELD = "images"


class _Metrics:
    """Our counters, beside BentoML's own on /metrics (created lazily: BentoML sets up Prometheus first)."""

    def __init__(self) -> None:
        self._rejected = self._predicted = self._nonfinite = None

    def _counters(self):
        if self._rejected is None:
            import bentoml

            self._rejected = bentoml.metrics.Counter(
                name="transferkit_rejected_inputs", documentation="Requests refused before inference, by reason",
                labelnames=["reason"])
            self._predicted = bentoml.metrics.Counter(
                name="transferkit_images_predicted", documentation="Images classified and answered")
            self._nonfinite = bentoml.metrics.Counter(
                name="transferkit_nonfinite_outputs", documentation="Images whose model output was not finite")
        return self._rejected, self._predicted, self._nonfinite

    def rejected(self, reason: str) -> None:
        self._counters()[0].labels(reason=reason).inc()

    def predicted(self, count: int) -> None:
        self._counters()[1].inc(count)

    def nonfinite(self, count: int) -> None:
        self._counters()[2].inc(count)


metrics = _Metrics()


class RequestError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def _error(status: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "reason": reason}, status_code=status)


async def _read_images(request: Request, settings: ServiceSettings) -> list[tuple[str, bytes]]:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestError(415, "unsupported_media_type",
                           f"expected multipart/form-data with one or more '{FIELD}' file fields, got "
                           f"{content_type.split(';')[0] or 'no Content-Type'}")
    try:
        # max_files one above the cap, so that "too many" is ours to say (with the limit) and not Starlette's.
        form = await request.form(max_files=settings.max_images + 1, max_fields=16, max_part_size=64 * 1024)
    except Exception as exc:  # starlette's MultiPartException and the parser's own errors
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        if "Too many files" in message:
            raise RequestError(413, "too_many_images",
                               f"at most {settings.max_images} images per request") from None
        raise RequestError(400, "bad_multipart", f"malformed multipart/form-data body: {message}") from None
    try:
        unexpected = sorted(set(form.keys()) - {FIELD})
        if unexpected:
            raise RequestError(400, "unexpected_field",
                               f"unexpected form field(s) {', '.join(map(repr, unexpected[:5]))}: send images as "
                               f"'{FIELD}' file fields")
        parts = form.getlist(FIELD)
        if not parts:
            raise RequestError(400, "missing_field", f"no '{FIELD}' file field in the request")
        if len(parts) > settings.max_images:
            raise RequestError(413, "too_many_images", f"at most {settings.max_images} images per request, "
                                                       f"got {len(parts)}")
        images = []
        for index, part in enumerate(parts):
            if not isinstance(part, UploadFile):
                raise RequestError(400, "not_a_file", f"{FIELD}[{index}] is a text value; '{FIELD}' must be a file "
                                                      f"upload (curl -F {FIELD}=@photo.jpg)")
            data = await part.read()
            name = _safe_name(part.filename, index)
            if not data:
                raise RequestError(400, "empty_file", f"{name} is empty (0 bytes)")
            images.append((name, data))
        return images
    finally:
        await form.close()


def _safe_name(filename: str | None, index: int) -> str:
    """A label for error messages: the client's file name, shortened and without control characters."""
    label = f"{FIELD}[{index}]"
    if filename:
        clean = "".join(ch for ch in filename if ch.isprintable())[:80]
        label += f" ({clean})"
    return label


def _decode_all(images: list[tuple[str, bytes]], size: int, max_pixels: int) -> np.ndarray:
    pixels = []
    for name, data in images:
        try:
            pixels.append(decode_image(data, size, max_pixels=max_pixels))
        except InvalidImageError as exc:
            raise RequestError(exc.http_status, exc.reason, f"{name}: {exc}") from None
    return np.stack(pixels)


def _dropped_connection(exc: Exception) -> bool:
    import aiohttp

    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError)):
        return True
    return isinstance(exc, RuntimeError) and ("Connection closed" in str(exc) or "Session is closed" in str(exc))


async def _classify(service, pixels: np.ndarray, attempts: int = 3):
    """Call the model process, retrying when the pooled keep-alive connection was closed under us.

    BentoML's inter-service client keeps connections longer than uvicorn's 5 s keep-alive, so a reused connection
    can be closed by the server mid-request (bentoml/BentoML#4971; fix proposed in #5698). Inference is
    idempotent and the failure is the connection's, not the request's, so a retry is safe.
    """
    for attempt in range(attempts):
        try:
            return await service.model.to_async.classify(pixels)
        except Exception as exc:
            if attempt == attempts - 1 or not _dropped_connection(exc):
                raise
            logger.warning("transferkit: connection to the model process dropped (%s); retrying",
                           type(exc).__name__)
    raise AssertionError("unreachable")


def _model_error(exc: Exception) -> JSONResponse:
    """Errors of the model call: overload (503 from the batcher, 429) passes through, anything else is masked."""
    from bentoml.exceptions import BentoMLException

    status = int(getattr(getattr(exc, "error_code", None), "value", 500)) if isinstance(exc, BentoMLException) else 500
    if status in (429, 503, 504):
        metrics.rejected("overloaded")
        return _error(status, "overloaded", "the model is busy and cannot answer within its latency budget; "
                                            "retry with backoff")
    logger.error("transferkit: model call failed: %s: %s", type(exc).__name__, exc)
    return _error(500, "model_error", "the model failed to answer; this is a server fault and has been logged")


def build_app(get_service: Callable[[], Any], settings: ServiceSettings) -> Starlette:
    """The Starlette app; ``get_service`` returns the running ``ImageClassifier`` instance."""
    from transferkit.export.predictors import top_k

    async def predict(request: Request) -> JSONResponse:
        service = get_service()
        manifest = service.manifest
        if manifest is None:
            return _error(503, "not_ready", "the model is not loaded; see the server log")
        try:
            images = await _read_images(request, settings)
            # Decoding is CPU work: keep it off the event loop so probes and other requests stay responsive.
            pixels = await asyncio.to_thread(_decode_all, images, manifest.image_size, settings.max_pixels)
        except RequestError as exc:
            metrics.rejected(exc.reason)
            return _error(exc.status, exc.reason, exc.message)
        try:
            probabilities = np.asarray(await _classify(service, pixels))
        except Exception as exc:
            return _model_error(exc)
        finite = np.isfinite(probabilities).all(axis=1)
        if not finite.all():
            metrics.nonfinite(int((~finite).sum()))
            logger.error("transferkit: non-finite model output for %d of %d images", (~finite).sum(), len(finite))
            return _error(500, "nonfinite_output", "the model produced an invalid (non-finite) answer; this is a "
                                                   "server fault and has been logged")
        metrics.predicted(len(pixels))
        return JSONResponse(top_k(probabilities, manifest.class_names, settings.top_k))

    async def metadata(request: Request) -> JSONResponse:
        service = get_service()
        manifest = service.manifest
        if manifest is None:
            return _error(503, "not_ready", "the model is not loaded; see the server log")
        try:
            runtime = await service.model.to_async.describe()
        except Exception as exc:  # the model process is still starting
            runtime = {"state": "unavailable", "error": type(exc).__name__}
        return JSONResponse({
            "name": manifest.name, "version": manifest.version, "backbone": manifest.backbone,
            "classes": manifest.class_names, "image_size": manifest.image_size,
            "input": "multipart/form-data, one or more 'images' file fields (JPEG, PNG, BMP, GIF, WebP)",
            "backend": settings.backend, "runtime": runtime,
            "batching": {"max_batch_size": settings.max_batch_size, "max_latency_ms": settings.max_latency_ms,
                         "model_workers": settings.model_workers},
            "limits": {"max_images_per_request": settings.max_images, "max_body_bytes": settings.max_body_bytes,
                       "max_pixels_per_image": settings.max_pixels, "timeout_s": settings.timeout_s,
                       "max_concurrency": settings.max_concurrency},
            "top_k": settings.top_k,
            "checksums": {name: entry.sha256 for name, entry in manifest.formats.items()},
            "validation_passed": bool(manifest.validation and manifest.validation.passed),
        })

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, reason, f"{request.method} {request.url.path}: {exc.detail}")

    return Starlette(
        routes=[Route("/predict", predict, methods=["POST"]), Route("/metadata", metadata, methods=["GET"])],
        exception_handlers={HTTPException: http_error},
    )
