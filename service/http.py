"""The HTTP endpoints of the image service, as a Starlette app mounted into the BentoML entry service.

``POST /predict``, ``POST /explain`` and ``GET /metadata`` live here; the Open Inference Protocol (``/v2/...``) in
:mod:`transferkit.service.oip`. Both answer through the same entry object (service/service.py), which decodes and
classifies in whichever layout runs, and through the same error contract (:mod:`transferkit.service.errors`, also used
by the middleware): JSON ``{"error", "reason"}``, 4xx for the client's mistakes, 503 with ``Retry-After`` when retrying
helps, 500 only for a server fault, with a generic message.

Outside both, the route guard (service/guard.py) answers 401/404/405/431 before BentoML's middleware runs, and
uvicorn's protocol (service/connections.py) 400/408/431 before a request exists.

Why not a ``@bentoml.api`` taking ``list[Path]``: BentoML's multipart parser turns a *text* value in a file field into
a URL and downloads it, and its image types trust the part's Content-Type. Here every part is checked to be a real
file upload, read into memory (the body is already capped by :mod:`transferkit.service.middleware`), and decoded from
its bytes alone by :func:`transferkit.core.images.decode_image`, so one bad image fails only its request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from transferkit.core.errors import ModelUnavailable, ServiceError
from transferkit.service.errors import SERVER_FAULT_REASON, as_service_error, error_response
from transferkit.service.settings import Plan, ServiceSettings

logger = logging.getLogger("transferkit.service")
FIELD = "images"
TOP_K = "top_k"  # per request: a query parameter or a form field
T = TypeVar("T")


class Entry(Protocol):
    """What the routes need from one served model (either layout; service/models.py chooses it per request)."""

    name: str
    manifest: Any  # the bundle's Manifest, None when it could not be read
    load_error: str | None
    backend: str  # the backend that runs it
    choice: Any  # why that backend (transferkit.core.backends.Choice)

    async def infer_encoded(self, images: list[tuple[str, bytes]]) -> np.ndarray: ...
    async def infer_pixels(self, pixels: np.ndarray) -> np.ndarray: ...
    # (probabilities, top-class activation maps [N, h, w], the decoded pixels) / (probabilities, maps)
    async def explain_encoded(self, images: list[tuple[str, bytes]]) -> tuple: ...
    async def explain_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    async def describe(self) -> dict: ...
    def is_ready(self) -> bool: ...


# Histogram buckets. Seconds: from a 1 ms decode of a thumbnail to the 30 s default request timeout. Images (per
# request, per model call): powers of two up to 128 (TRANSFERKIT_MAX_IMAGES is 16, TRANSFERKIT_MAX_BATCH_SIZE 32).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
IMAGES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STAGES = ("decode", "queue", "inference")  # what :meth:`_Metrics.observe` times, each its own histogram


class _Metrics:
    """Our metrics, beside BentoML's own on /metrics (created lazily: BentoML sets up Prometheus first, and in
    multiprocess mode, so that /metrics adds up every worker's and the model processes' values).

    Names follow Prometheus' conventions: a unit suffix (``_seconds``), ``_total`` on counters (the client adds it),
    an ``_info`` gauge of value 1 whose labels say what is deployed. Every label value comes from a fixed set (the
    refusal reasons) or from the bundles and settings the server runs (model names: only configured ones), so no
    client can add a series."""

    def __init__(self) -> None:
        self._counters: tuple | None = None
        self._stages: dict[str, Any] = {}
        self._model_events: tuple = ()

    def _get(self) -> tuple:
        if self._counters is None:
            import bentoml

            self._counters = (
                bentoml.metrics.Counter(name="transferkit_rejected_inputs",
                                        documentation="Requests refused before inference, by reason",
                                        labelnames=["reason"]),
                bentoml.metrics.Counter(name="transferkit_images_predicted",
                                        documentation="Images classified and answered, by model",
                                        labelnames=["model"]),
                bentoml.metrics.Counter(name="transferkit_nonfinite_outputs",
                                        documentation="Images whose model output was not finite"),
                bentoml.metrics.Counter(name="transferkit_connections_handed_back",
                                        documentation="Keep-alive connections closed by a worker busier than "
                                                      "another (service/balance.py)"),
                bentoml.metrics.Histogram(name="transferkit_microbatch_size",
                                          documentation="Images per model call in the microbatch layout",
                                          buckets=IMAGES_BUCKETS),
                bentoml.metrics.Histogram(name="transferkit_request_images",
                                          documentation="Images per answered request (/predict and /v2 infer), "
                                                        "by model",
                                          labelnames=["model"], buckets=IMAGES_BUCKETS),
                # max: every worker sets the same labels to 1; one series for the server, no pid label.
                bentoml.metrics.Gauge(name="transferkit_model_info",
                                      documentation="The model served (value 1): name, version, backend, layout",
                                      labelnames=["model", "version", "backend", "layout"],
                                      multiprocess_mode="max"),
            )
            self._model_events = (
                bentoml.metrics.Counter(name="transferkit_model_events",
                                        documentation="Versions loaded, failed to load and unloaded, by model and "
                                                      "event, per worker (service/reload.py)",
                                        labelnames=["model", "event"]),
                bentoml.metrics.Histogram(name="transferkit_model_load_seconds",
                                          documentation="Seconds to verify, load and warm a new version, by model",
                                          labelnames=["model"], buckets=SECONDS_BUCKETS),
                bentoml.metrics.Counter(name="transferkit_model_requests",
                                        documentation="Requests that reached a served model, by model and the "
                                                      "status they were answered",
                                        labelnames=["model", "code"]))
            self._stages = {stage: bentoml.metrics.Histogram(name=f"transferkit_{stage}_seconds",
                                                             documentation=STAGE_DOCUMENTATION[stage],
                                                             buckets=SECONDS_BUCKETS)
                            for stage in STAGES}
        return self._counters

    def prepare(self, reasons: tuple[str, ...]) -> None:
        """Create the metrics, and a zero series for each of ``reasons``: the series /metrics lists do not change
        when a client first provokes one (and ``rate()`` has a starting point)."""
        for reason in reasons:
            self._get()[0].labels(reason=reason)

    def rejected(self, reason: str) -> None:
        self._get()[0].labels(reason=reason).inc()

    def predicted(self, model: str, count: int) -> None:
        """An answered request of ``count`` images, by ``model`` (a served model's name)."""
        self._get()[1].labels(model=model).inc(count)
        self._get()[5].labels(model=model).observe(count)
        self.model_request(model, 200)

    def model_request(self, model: str, status: int) -> None:
        """A request for ``model`` that got as far as its model, by the status it was answered (a fixed set)."""
        self._get()
        self._model_events[2].labels(model=model, code=str(status)).inc()

    def nonfinite(self, count: int) -> None:
        self._get()[2].inc(count)

    def handed_back(self) -> None:
        self._get()[3].inc()

    def microbatch(self, images: int) -> None:
        self._get()[4].observe(images)

    def model_info(self, model: str, version: str, backend: str, layout: str, value: int = 1) -> None:
        """Say which model runs (from its manifest and the server's settings; 0 once a version is swapped out)."""
        self._get()[6].labels(model=model, version=version, backend=backend, layout=layout).set(value)

    def model_event(self, model: str, event: str, seconds: float | None = None) -> None:
        """``loaded`` (with its seconds), ``load_failed`` or ``unloaded``: one worker's change of a model."""
        self._get()
        self._model_events[0].labels(model=model, event=event).inc()
        if seconds is not None:
            self._model_events[1].labels(model=model).observe(seconds)

    def observe(self, stage: str, seconds: float) -> None:
        """One duration of ``stage`` (one of :data:`STAGES`); called from compute and model threads too
        (prometheus_client's metrics are thread-safe)."""
        self._get()
        self._stages[stage].observe(seconds)

    def timed(self, stage: str, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` that observes its duration as ``stage`` when it returns (not when it raises: a refused image
        says nothing about how long decoding takes)."""

        def timed_call(*args: Any, **kwargs: Any) -> T:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.observe(stage, time.perf_counter() - start)
            return result

        return timed_call


STAGE_DOCUMENTATION = {
    "decode": "Seconds to decode one request's images into pixels (requests whose images all decode)",
    "queue": "Seconds a request waited before its model work started: inprocess, for a decode slot and a compute "
             "thread; microbatch, in the micro-batch queue; not observed in the batched layout",
    "inference": "Seconds per model call (one request in inprocess, a merged batch in microbatch and batched)",
}


metrics = _Metrics()


def error_for(exc: BaseException, model: str | None = None) -> JSONResponse:
    """The answer to an exception of the request pipeline (``/predict`` and ``/v2`` alike): the one mapping
    (:func:`transferkit.service.errors.error_response`), each refusal counted by its reason (and by ``model``, the
    served model the request was for, when it got that far)."""
    refusal = as_service_error(exc)  # logs a server fault
    if refusal.reason != SERVER_FAULT_REASON:
        metrics.rejected(refusal.reason)
    if model is not None:
        metrics.model_request(model, refusal.status)
    return error_response(refusal)


def unavailable(entry: Entry) -> ModelUnavailable:
    """The entry could not read its bundle's manifest: nothing can be answered (not counted as a rejected input)."""
    return ModelUnavailable("model_unavailable",
                            f"the model is not available: {entry.load_error or 'see the server log'}")


def checked_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Refuse non-finite model output (a counted, masked 500), never serialise it as null."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    finite = np.isfinite(probabilities).all(axis=1)
    if not finite.all():
        metrics.nonfinite(int((~finite).sum()))
        logger.error("transferkit: non-finite model output for %d of %d images", (~finite).sum(), len(finite))
        raise ServiceError(500, "nonfinite_output", "the model produced an invalid (non-finite) answer; this is a "
                                                    "server fault and has been logged")
    return probabilities


async def _read_form(request: Request, settings: ServiceSettings) -> FormData:
    """The multipart form, parsed with limits; every way it can be malformed is a 4xx."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ServiceError(415, "unsupported_media_type",
                           f"expected multipart/form-data with one or more '{FIELD}' file fields, got "
                           f"{content_type.split(';')[0] or 'no Content-Type'}")
    try:
        # max_files one above the cap, so that "too many" is ours to say (with the limit) and not Starlette's.
        return await request.form(max_files=settings.max_images + 1, max_fields=16, max_part_size=64 * 1024)
    except Exception as exc:  # starlette's MultiPartException and the parser's own errors
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        if "Too many files" in message:
            raise ServiceError(413, "too_many_images", f"at most {settings.max_images} images per request") from None
        raise ServiceError(400, "bad_multipart", f"malformed multipart/form-data body: {message}") from None


def _image_parts(form: FormData, max_images: int) -> list:
    """The form's ``images`` parts, refusing any other field (``top_k`` aside), none, or too many."""
    unexpected = sorted(set(form.keys()) - {FIELD, TOP_K})
    if unexpected:
        raise ServiceError(400, "unexpected_field",
                           f"unexpected form field(s) {', '.join(map(repr, unexpected[:5]))}: send images as "
                           f"'{FIELD}' file fields (and optionally one '{TOP_K}' text field)")
    parts = form.getlist(FIELD)
    if not parts:
        raise ServiceError(400, "missing_field", f"no '{FIELD}' file field in the request")
    if len(parts) > max_images:
        raise ServiceError(413, "too_many_images", f"at most {max_images} images per request, got {len(parts)}")
    return parts


def requested_top_k(values: list[Any], num_classes: int, default: int) -> int:
    """The labels per image a request asks for. ``values``: its ``top_k`` query parameters and form fields
    together; none gives the server's setting (TRANSFERKIT_TOP_K, capped at the classes as it always was).

    A request's own value must be one plain decimal integer from 1 to the number of classes: asking for more labels
    than exist, or for none, is a mistake the client should hear about (400 ``bad_top_k``), not one to repair
    silently. (``/v2``'s classification extension keeps Triton's reading instead: 0 asks for probabilities and a
    larger count is capped, which tritonclient users rely on.)"""
    if not values:
        return max(1, min(default, num_classes))
    if len(values) > 1:
        raise ServiceError(400, "bad_top_k", f"'{TOP_K}' given {len(values)} times (query and form together); "
                                             f"give it once")
    value = values[0]
    if not isinstance(value, str):
        raise ServiceError(400, "bad_top_k", f"'{TOP_K}' must be a text field, not a file upload")
    # isdigit() alone admits other scripts' digits ('٣'); isascii() keeps it to 0-9. Nine digits: int() stays cheap.
    if not (value.isascii() and value.isdigit() and len(value) <= 9) or not 1 <= int(value) <= num_classes:
        shown = ascii(value) if len(value) <= 20 else ascii(value[:17]) + "..."
        raise ServiceError(400, "bad_top_k", f"'{TOP_K}' must be an integer from 1 to {num_classes} (the model's "
                                             f"classes), got {shown}")
    return int(value)


async def _read_images(request: Request, settings: ServiceSettings) -> tuple[list[tuple[str, bytes]], list[Any]]:
    """The request's images as (label, bytes), and the values of its ``top_k`` form field (usually none)."""
    form = await _read_form(request, settings)
    try:
        images = []
        for index, part in enumerate(_image_parts(form, settings.max_images)):
            if not isinstance(part, UploadFile):
                raise ServiceError(400, "not_a_file", f"{FIELD}[{index}] is a text value; '{FIELD}' must be a file "
                                                      f"upload (curl -F {FIELD}=@photo.jpg)")
            data = await part.read()
            name = _safe_name(part.filename, index)
            if not data:
                raise ServiceError(400, "empty_file", f"{name} is empty (0 bytes)")
            images.append((name, data))
        return images, form.getlist(TOP_K)
    finally:
        await form.close()


def _safe_name(filename: str | None, index: int) -> str:
    """A label for error messages: the client's file name, shortened and without control characters."""
    label = f"{FIELD}[{index}]"
    if filename:
        clean = "".join(ch for ch in filename if ch.isprintable())[:80]
        label += f" ({clean})"
    return label


def _served(service: Any, request: Request) -> Entry:
    """The model a request names (or the default), which must have a readable bundle (refusals here are about the
    service, not the client's input: not counted as rejected inputs)."""
    from transferkit.service.models import select

    entry = select(service, request)
    if entry.manifest is None:
        raise unavailable(entry)
    return entry


def predict_endpoint(get_entry: Callable[[], Any], settings: ServiceSettings) -> Callable:
    """``POST /predict``: multipart images in, top-k labels per image out (``top_k`` per request or the server's)."""
    from transferkit.core.predictors import top_k

    async def predict(request: Request) -> JSONResponse:
        try:
            entry = _served(get_entry(), request)
        except ServiceError as exc:
            return error_response(exc)
        classes = entry.manifest.class_names
        try:
            query = request.query_params.getlist(TOP_K)
            requested_top_k(query, len(classes), settings.top_k)  # a bad query value: refused before the body
            images, form_values = await _read_images(request, settings)
            k = requested_top_k(query + form_values, len(classes), settings.top_k)
            probabilities = checked_probabilities(await entry.infer_encoded(images))
        except Exception as exc:
            return error_for(exc, entry.name)
        metrics.predicted(entry.name, len(probabilities))
        return JSONResponse(top_k(probabilities, classes, k))

    return predict


EXPLAIN_FORMATS = ("png", "json")


def require_cam(manifest: Any, backend: str) -> None:
    """404 ``no_class_activation_map``, with the reason, where neither the served backend nor the fp32 onnx file
    answers a map for this bundle (core/predictors.py's ``explaining_backend``)."""
    from transferkit.core.predictors import explaining_backend, map_refusal

    if explaining_backend(manifest, backend) is None:
        raise ServiceError(404, "no_class_activation_map", f"model {manifest.name!r} has no class activation map "
                                                          f"on {backend}: {map_refusal(manifest, backend)}")


def _explain_format(request: Request) -> str:
    values = request.query_params.getlist("format")
    if len(values) > 1 or (values and values[0] not in EXPLAIN_FORMATS):
        raise ServiceError(400, "bad_format", f"'format' must be one of {', '.join(EXPLAIN_FORMATS)} (once), got "
                                              f"{ascii(values[:2])[:60]}")
    return values[0] if values else "png"


def explain_endpoint(get_entry: Callable[[], Any], settings: ServiceSettings) -> Callable:
    """``POST /explain``: where the model looked. One image -> a PNG overlay of its top class's activation map
    (``X-Label``/``X-Score`` headers); ``?format=json`` -> per image ``{label, score, cam}``, any number of images."""
    from starlette.responses import Response

    from transferkit.core.explain import cam_payload, overlay_png

    async def explain(request: Request) -> Response:
        try:
            entry = _served(get_entry(), request)
        except ServiceError as exc:
            return error_response(exc)
        classes = entry.manifest.class_names
        try:
            require_cam(entry.manifest, entry.backend)
            kind = _explain_format(request)
            images, form_values = await _read_images(request, settings)
            if form_values:
                raise ServiceError(400, "unexpected_field", f"/explain takes no '{TOP_K}': it maps the top class")
            if kind == "png" and len(images) != 1:
                raise ServiceError(400, "one_image_per_png", f"a PNG answer holds one image's map, got {len(images)} "
                                                             "images: send one, or ask ?format=json")
            probabilities, maps, pixels = await entry.explain_encoded(images)
            probabilities = checked_probabilities(probabilities)
        except Exception as exc:
            return error_for(exc, entry.name)
        metrics.predicted(entry.name, len(probabilities))
        best = probabilities.argmax(1)
        if kind == "json":
            return JSONResponse([{"label": classes[b], "score": float(p[b]), "cam": cam_payload(m)}
                                 for b, p, m in zip(best, probabilities, maps)])
        return Response(overlay_png(pixels[0], maps[0]), media_type="image/png",
                        headers={"X-Label": ascii(classes[best[0]])[1:-1],
                                 "X-Score": f"{probabilities[0, best[0]]:.6f}"})

    return explain


def metadata_document(name: str, manifest: Any, runtime: dict, settings: ServiceSettings, plan: Plan,
                      choice) -> dict:
    """``GET /metadata``'s answer for the model served as ``name``: the bundle, the backend and layout chosen and
    why, the limits, the runtime."""
    return {
        "name": name, "bundle_name": manifest.name, "version": manifest.version, "backbone": manifest.backbone,
        "classes": manifest.class_names, "image_size": manifest.image_size,
        "input": "multipart/form-data, one or more 'images' file fields (JPEG, PNG, BMP, GIF, WebP); labels per "
                 f"image: 'top_k' (query parameter or form field, 1 to {len(manifest.class_names)}; default: "
                 f"'top_k' below)",
        "openapi": "/docs.json",
        "protocols": {"predict": f"/predict?model={name}", "open_inference_protocol": f"/v2/models/{name}",
                      "explain": f"/explain?model={name}"},
        "explain": _explain_document(manifest, choice.backend),
        "backend": choice.backend,
        "backend_choice": {"setting": settings.backend, "reason": choice.reason, "cpu": choice.cpu,
                           "batch_scaling": choice.batch_scaling, "images_per_second": choice.images_per_second,
                           "skipped": choice.skipped},
        "layout": {"name": plan.layout, "reason": plan.reason, "cores": plan.cores, "gpus": plan.gpus,
                   "entry_workers": plan.entry_workers, "model_workers": plan.model_workers,
                   "threads_per_session": plan.threads},
        "runtime": runtime,
        "batching": _batching(settings, plan),
        "limits": {"max_images_per_request": settings.max_images, "max_body_bytes": settings.max_body_bytes,
                   "max_pixels_per_image": settings.max_pixels, "timeout_s": settings.timeout_s,
                   "max_concurrency": settings.max_concurrency, "decode_concurrency": settings.decode_concurrency,
                   "decode_memory_mb": settings.decode_memory_mb, "drain_timeout_s": settings.drain_timeout_s},
        "top_k": settings.top_k,
        "checksums": {name: entry.sha256 for name, entry in manifest.formats.items()},
        "validation_passed": bool(manifest.validation and manifest.validation.passed),
    }


def _explain_document(manifest: Any, backend: str) -> dict:
    """Whether ``/explain`` and ``/v2``'s ``cam`` answer on the served backend, how the map is made, or why not."""
    from transferkit.core.predictors import explaining_backend, map_refusal

    answering = explaining_backend(manifest, backend)
    described = manifest.explain.model_dump() if manifest.explain else {}
    return {**described, "available": answering is not None, "backend": answering,
            "reason": map_refusal(manifest, backend)}


def _batching(settings: ServiceSettings, plan: Plan) -> dict | None:
    if plan.layout == "batched":
        return {"max_batch_size": settings.max_batch_size, "max_latency_ms": settings.max_latency_ms}
    if plan.layout == "microbatch":
        return {"max_batch_size": settings.max_batch_size,
                "queue_delay": "none: whatever is queued when the model is free"}
    return None


async def model_list(service: Any) -> list[dict]:
    """``/metadata``'s ``models``: every served model, its state and where to address it."""
    listed = []
    service.models.refresh()
    for name, slot in list(service.models.slots.items()):  # a load may add a slot while this awaits
        entry = slot.current
        # Described first: in the batched layout that is how the entry learns of a version its model swapped in.
        described = await entry.describe() if entry is not None and entry.manifest is not None else {}
        manifest = getattr(entry, "manifest", None)
        state = "unloaded" if entry is None else described.get("state") if manifest is not None else "failed"
        reason = slot.reason or described.get("reason")  # the batched model process's last failed load
        listed.append({"name": name, "version": manifest.version if manifest else None,
                       "backend": getattr(entry, "backend", None), "state": state,
                       "default": name == service.models.default, **({"reason": reason} if reason else {}),
                       "metadata": f"/metadata?model={name}", "open_inference_protocol": f"/v2/models/{name}"})
    return listed


def metadata_endpoint(get_entry: Callable[[], Any], settings: ServiceSettings, plan: Plan) -> Callable:
    """``GET /metadata``: the model ``?model=`` names (or the default), with the list of every served model; where
    several are served and none is the default, the list alone."""
    from transferkit.service.models import requested_model

    async def metadata(request: Request) -> JSONResponse:
        service = get_entry()
        try:
            if requested_model(request) is None and service.models.default is None:
                return JSONResponse({"models": await model_list(service), "layout": {"name": plan.layout}})
            entry = _served(service, request)
        except ServiceError as exc:
            return error_response(exc)
        described = await entry.describe()  # first: the manifest may follow a version swapped in (batched)
        document = metadata_document(entry.name, entry.manifest, described, settings, plan, entry.choice)
        return JSONResponse({**document, "models": await model_list(service)})

    return metadata


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) in the service's error shape."""
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(ServiceError(exc.status_code, reason, f"{request.method} {request.url.path}: {exc.detail}"))


def build_app(get_entry: Callable[[], Any], settings: ServiceSettings, plan: Plan,
              control: Any | None = None) -> Starlette:
    """The Starlette app; ``get_entry`` returns the running entry service instance, whose ``models``
    (service/models.py) the routes choose from; ``control``: the model-control routes (service/control.py; none:
    not served). Its routes are in BentoML's OpenAPI document (service/openapi.py)."""
    from transferkit.service import openapi
    from transferkit.service.oip import oip_routes

    app = Starlette(
        routes=[Route("/predict", predict_endpoint(get_entry, settings), methods=["POST"]),
                Route("/explain", explain_endpoint(get_entry, settings), methods=["POST"]),
                Route("/metadata", metadata_endpoint(get_entry, settings, plan), methods=["GET"]),
                *oip_routes(get_entry, settings), *(control.routes() if control is not None else [])],
        exception_handlers={HTTPException: http_error},
    )
    openapi.attach(app, lambda: openapi.document(get_entry, settings))
    return app
