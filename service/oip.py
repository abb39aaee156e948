"""The Open Inference Protocol (KServe v2, as spoken by Triton, KServe, MLServer, Seldon, OpenVINO Model Server).

Endpoints: ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``, ``GET /v2/models/{name}``
(model metadata), ``/v2/models/{name}/ready`` and ``POST /v2/models/{name}/infer`` (each also under
``/versions/{version}``). One input per request, either

- ``images``: ``BYTES [N]``, each element one encoded image file (JPEG, PNG, BMP, GIF, WebP). With the binary-data
  extension each element is a 4-byte little-endian length and the file's bytes; in JSON each element is the file's
  base64 text (JSON strings cannot hold raw bytes);
- ``pixels``: ``UINT8 [N, S, S, 3]`` RGB at the model's input size S, already decoded.

The output ``probabilities`` is ``FP32 [N, C]`` (class order as in the metadata). The classification extension
(``"parameters": {"classification": k}`` on the requested output) returns ``BYTES [N, k]`` elements
``"score:index:label"`` instead. Outputs come as JSON unless the binary-data extension is asked for (per output
``"binary_data": true`` or the request's ``"binary_data_output": true``). Errors: the same statuses and reasons as
``/predict``, as ``{"error", "reason"}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import transferkit
from transferkit.core.errors import ServiceError
from transferkit.core.manifest import RUNTIME_BACKENDS
from transferkit.service.errors import error_response
from transferkit.service.http import checked_probabilities, error_for, metrics, unavailable
from transferkit.service.settings import ServiceSettings

HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUT = "probabilities"
EXTENSIONS = ["binary_tensor_data", "classification"]
# KServe/Triton platform names by engine (transferkit/core/backends.py's choice decides which runs).
PLATFORM = {"tensorflow": "tensorflow_savedmodel", "onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}


def _bad(message: str, reason: str = "bad_tensor", status: int = 400) -> ServiceError:
    return ServiceError(status, reason, message)


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """Split a request into its JSON header and the binary tensor data that follows it (binary-data extension)."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH} must be an integer, got {header_length[:20]!r}", "bad_request") from None
        if not 0 < size <= len(body):
            raise _bad(f"{HEADER_LENGTH}={size} does not fit a body of {len(body)} bytes", "bad_request")
        head, binary = body[:size], body[size:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the inference request is not valid JSON: {exc}", "bad_request") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise _bad("the inference request must be a JSON object with an 'inputs' list", "bad_request")
    return request, binary


def _shape(tensor: dict) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _bad(f"input {tensor.get('name')!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    flat: list = []
    for item in data:
        flat.extend(_flatten(item))
    return flat


def _split_bytes_elements(raw: bytes, count: int, name: str) -> list[bytes]:
    """BYTES tensor in binary form: each element a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise _bad(f"input {name!r}: truncated BYTES element length at offset {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise _bad(f"input {name!r}: BYTES element {len(elements)} declares {length} bytes, only "
                       f"{len(raw) - offset} remain")
        elements.append(raw[offset:offset + length])
        offset += length
    if len(elements) != count:
        raise _bad(f"input {name!r}: shape says {count} elements, the data holds {len(elements)}")
    return elements


def _declared_binary(tensor: dict, binary: bytes) -> bytes | None:
    """The input's binary data (binary-data extension), None when it comes as JSON ``data``; the two must agree."""
    name = tensor.get("name")
    parameters = tensor.get("parameters") or {}
    binary_size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size < 0 or binary_size != len(binary):
            raise _bad(f"input {name!r}: binary_data_size {binary_size!r} does not match the {len(binary)} bytes "
                       f"after the JSON header")
        if "data" in tensor:
            raise _bad(f"input {name!r}: give either 'data' or binary data, not both")
        return binary
    if binary:
        raise _bad(f"{len(binary)} bytes follow the JSON header but no input declares binary_data_size")
    if "data" not in tensor:
        raise _bad(f"input {name!r} has no 'data' and no binary data")
    return None


def _at_most(images: int, max_images: int) -> None:
    if images > max_images:
        raise ServiceError(413, "too_many_images", f"at most {max_images} images per request, got {images}")


def _image_files(tensor: dict, count: int, binary: bytes | None) -> list[bytes]:
    """The encoded files of an ``images`` input: length-prefixed binary elements, or base64 strings in JSON."""
    if binary is not None:
        return _split_bytes_elements(binary, count, "images")
    elements = _flatten(tensor["data"])
    if len(elements) != count or not all(isinstance(e, str) for e in elements):
        raise _bad(f"input 'images': expected {count} base64 strings in 'data'")
    try:
        return [base64.b64decode(e, validate=True) for e in elements]
    except (binascii.Error, ValueError):
        raise _bad("input 'images': JSON elements must be the base64 text of each image file") from None


def _images_input(tensor: dict, shape: list[int], binary: bytes | None, max_images: int) -> list[tuple[str, bytes]]:
    """``images`` (BYTES [N] or [N, 1]): [(label, file bytes)], none of them empty."""
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise _bad(f"input 'images': expected BYTES [N] (or [N,1]), got shape {shape}")
    count = math.prod(shape)
    if count == 0:
        raise _bad("input 'images' is empty: send at least one image")
    _at_most(shape[0], max_images)
    images = []
    for index, data in enumerate(_image_files(tensor, count, binary)):
        if not data:
            raise ServiceError(400, "empty_file", f"images[{index}] is empty (0 bytes)")
        images.append((f"images[{index}]", data))
    return images


def _pixels_input(tensor: dict, shape: list[int], binary: bytes | None, size: int, max_images: int) -> np.ndarray:
    """``pixels`` (UINT8 [N, size, size, 3]): the decoded images as a uint8 array."""
    if len(shape) != 4 or shape[1:] != [size, size, 3]:
        raise _bad(f"input 'pixels': expected UINT8 [N,{size},{size},3] (RGB, NHWC), got shape {shape}")
    if shape[0] == 0:
        raise _bad("input 'pixels' is empty: send at least one image")
    _at_most(shape[0], max_images)
    count = math.prod(shape)
    if binary is not None:
        if len(binary) != count:
            raise _bad(f"input 'pixels': shape {shape} needs {count} bytes, got {len(binary)}")
        return np.frombuffer(binary, np.uint8).reshape(shape)
    values = _flatten(tensor["data"])
    if len(values) != count:
        raise _bad(f"input 'pixels': shape {shape} needs {count} values, 'data' holds {len(values)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
        raise _bad("input 'pixels': UINT8 values must be integers 0-255")
    return np.asarray(values, np.uint8).reshape(shape)


def read_input(request: dict, binary: bytes, size: int, max_images: int) -> tuple[str, Any]:
    """The one input tensor: ("images", [(label, bytes)]) or ("pixels", uint8 array [N, size, size, 3])."""
    inputs = request["inputs"]
    expected = f"'images' (BYTES [N]) or 'pixels' (UINT8 [N,{size},{size},3])"
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"expected exactly one input, {expected}; got {len(inputs)}")
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), _shape(tensor)
    data = _declared_binary(tensor, binary)
    if name == "images" and datatype == "BYTES":
        return "images", _images_input(tensor, shape, data, max_images)
    if name == "pixels" and datatype == "UINT8":
        return "pixels", _pixels_input(tensor, shape, data, size, max_images)
    raise _bad(f"expected {expected}; got {name!r} ({datatype} {shape})")


def requested_outputs(request: dict, num_classes: int) -> tuple[int, bool]:
    """(classification k or 0, binary?) from the request's ``outputs`` and ``parameters``."""
    parameters = request.get("parameters") or {}
    binary = bool(isinstance(parameters, dict) and parameters.get("binary_data_output"))
    outputs = request.get("outputs")
    if outputs is None:
        return 0, binary
    if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
        raise _bad(f"expected at most one requested output, {OUTPUT!r}")
    output = outputs[0]
    if output.get("name") != OUTPUT:
        raise _bad(f"unknown output {output.get('name')!r}: this model has one output, {OUTPUT!r}")
    options = output.get("parameters") or {}
    k = options.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise _bad(f"'classification' must be a non-negative integer, got {k!r}")
    return min(k, num_classes), bool(options.get("binary_data", binary))


def _bytes_tensor(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def infer_response(model: str, version: str, request_id: Any, probabilities: np.ndarray, classes: list[str],
                   k: int, binary: bool) -> Response:
    n = len(probabilities)
    if k:
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        labels = [f"{probabilities[i, j]:f}:{j}:{classes[j]}" for i in range(n) for j in order[i]]
        output: dict[str, Any] = {"name": OUTPUT, "datatype": "BYTES", "shape": [n, k]}
        payload = _bytes_tensor([label.encode() for label in labels])
        data: list = labels
    else:
        output = {"name": OUTPUT, "datatype": "FP32", "shape": [n, probabilities.shape[1]]}
        payload = np.ascontiguousarray(probabilities, "<f4").tobytes()
        data = probabilities.ravel().tolist()
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": [output]}
    if request_id is not None:
        head["id"] = request_id
    if not binary:
        output["data"] = data
        return JSONResponse(head)
    output["parameters"] = {"binary_data_size": len(payload)}
    header = json.dumps(head).encode()
    return Response(header + payload, media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


class OpenInferenceProtocol:
    """The ``/v2`` endpoints, answering for the entry returned by ``get_entry``."""

    def __init__(self, get_entry: Callable, settings: ServiceSettings, backend: str):
        self.get_entry, self.settings, self.backend = get_entry, settings, backend

    def routes(self) -> list[Route]:
        routes = [Route("/v2", self.server_metadata, methods=["GET"]),
                  Route("/v2/health/live", self.live, methods=["GET"]),
                  Route("/v2/health/ready", self.ready, methods=["GET"])]
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [Route(prefix, self.model_metadata, methods=["GET"]),
                       Route(prefix + "/ready", self.model_ready, methods=["GET"]),
                       Route(prefix + "/infer", self.infer, methods=["POST"])]
        return routes

    @staticmethod
    def model(entry, request: Request) -> Any:
        """The manifest of the model the path names; 503 when there is none, 404 for another name or version."""
        manifest = entry.manifest
        if manifest is None:
            raise unavailable(entry)
        name, version = request.path_params["name"], request.path_params.get("version")
        if name != manifest.name:
            raise ServiceError(404, "unknown_model", f"unknown model {name[:80]!r}: this server serves "
                                                     f"{manifest.name!r}")
        if version is not None and version != manifest.version:
            raise ServiceError(404, "unknown_version", f"model {manifest.name!r} has version {manifest.version!r} "
                                                       f"only, not {version[:80]!r}")
        return manifest

    @staticmethod
    async def serving(entry) -> bool:
        """The entry is ready and so is the model behind it (in the batched layout, another process)."""
        return entry.is_ready() and (await entry.describe()).get("state") == "ready"

    async def server_metadata(self, request: Request) -> JSONResponse:
        return JSONResponse({"name": "transferkit", "version": transferkit.__version__, "extensions": EXTENSIONS})

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200 if await self.serving(self.get_entry()) else 503)

    async def model_metadata(self, request: Request) -> JSONResponse:
        try:
            manifest = self.model(self.get_entry(), request)
        except ServiceError as exc:  # not a rejected input: not counted
            return error_response(exc)
        size = manifest.image_size
        return JSONResponse({
            "name": manifest.name, "versions": [manifest.version],
            "platform": PLATFORM[RUNTIME_BACKENDS[self.backend].engine],
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "UINT8", "shape": [-1, size, size, 3]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(manifest.class_names)]}],
            "parameters": {"classes": manifest.class_names, "one_input_of": ["images", "pixels"]},
        })

    async def model_ready(self, request: Request) -> Response:
        entry = self.get_entry()
        try:
            self.model(entry, request)
        except ServiceError as exc:  # the protocol's readiness is a bare status, except for a model it does not know
            return error_response(exc) if exc.status == 404 else Response(status_code=503)
        return Response(status_code=200 if await self.serving(entry) else 503)

    async def infer(self, request: Request) -> Response:
        entry = self.get_entry()
        try:
            manifest = self.model(entry, request)
        except ServiceError as exc:
            return error_response(exc)
        try:
            parsed, binary = parse_infer_request(await request.body(), request.headers.get(HEADER_LENGTH))
            kind, value = read_input(parsed, binary, manifest.image_size, self.settings.max_images)
            k, binary_out = requested_outputs(parsed, len(manifest.class_names))
            probabilities = checked_probabilities(await self.classify(entry, kind, value))
        except Exception as exc:
            return error_for(exc)
        metrics.predicted(len(probabilities))
        return infer_response(manifest.name, manifest.version, parsed.get("id"), probabilities,
                              manifest.class_names, k, binary_out)

    @staticmethod
    async def classify(entry, kind: str, value: Any) -> np.ndarray:
        """The request's one input through the entry: encoded images are decoded there, pixels go straight in."""
        if kind == "images":
            return await entry.infer_encoded(value)
        return await entry.infer_pixels(value)


def oip_routes(get_entry: Callable, settings: ServiceSettings, backend: str) -> list[Route]:
    """The ``/v2`` routes, answering for the entry returned by ``get_entry``."""
    return OpenInferenceProtocol(get_entry, settings, backend).routes()
