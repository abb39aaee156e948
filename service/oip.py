"""The Open Inference Protocol (KServe v2, as spoken by Triton, KServe, MLServer, Seldon, OpenVINO Model Server).

Endpoints: ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``, ``GET /v2/models/{name}``
(model metadata), ``/v2/models/{name}/ready`` and ``POST /v2/models/{name}/infer`` (each also under
``/versions/{version}``). One input per request, either

- ``images``: ``BYTES [N]``, each element one encoded image file (JPEG, PNG, BMP, GIF, WebP). With the binary-data
  extension each element is a 4-byte little-endian length and the file's bytes; in JSON each element is the file's
  base64 text (JSON strings cannot hold raw bytes);
- ``pixels``: ``UINT8 [N, S, S, 3]`` RGB at the model's input size S, already decoded.

The output ``probabilities`` is ``FP32 [N, C]`` (class order as in the metadata); a model whose graphs compute class
activation maps also has ``cam``, ``FP32 [N, h, w]`` (the top class's map), returned when requested by name. The
classification extension (``"parameters": {"classification": k}`` on the requested output) returns ``BYTES [N, k]``
elements ``"score:index:label"`` instead. Outputs come as JSON unless the binary-data extension is asked for (per output
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
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import transferkit
from transferkit.core.errors import ServiceError
from transferkit.core.manifest import RUNTIME_BACKENDS
from transferkit.service import strictjson
from transferkit.service.errors import error_response
from transferkit.service.http import checked_probabilities, error_for, metrics, unavailable
from transferkit.service.settings import ServiceSettings

HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUT = "probabilities"
CAM = "cam"  # the top class's activation map, FP32 [N, h, w]: requested by name, for a model that has one
EXTENSIONS = ["binary_tensor_data", "classification"]
# KServe/Triton platform names by engine (transferkit/core/backends.py's choice decides which runs).
PLATFORM = {"tensorflow": "tensorflow_savedmodel", "onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}


MAX_ID_CHARS = 1024  # the request id is echoed back: a bounded, valid string only
MAX_DIMS = 8
STRUCTURE_VALUES = 1024  # JSON values a request holds besides its tensor data (shape, parameters, outputs)
OFFLOAD_BYTES = 1 << 20  # bodies past this are parsed on a thread: the event loop keeps answering probes


def _bad(message: str, reason: str = "bad_tensor", status: int = 400) -> ServiceError:
    return ServiceError(status, reason, message)


def _kind(value: Any) -> str:
    """The JSON type of a parsed value, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    for types, name in ((dict, "an object"), (list, "an array"), (str, "a string"), ((int, float), "a number")):
        if isinstance(value, types):
            return name
    return "null"


def _show(value: Any) -> str:
    """A client's value in a message: short, ASCII, never a whole structure (nothing unbounded is echoed)."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = ascii(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return _kind(value)


def _object(value: Any, where: str) -> dict:
    """An optional JSON object (absent or null: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{where} must be a JSON object, got {_kind(value)}", "bad_request")
    return value


def _flag(parameters: dict, key: str, where: str, default: bool = False) -> bool:
    """A boolean parameter: JSON true or false only (the string "false" is not false's spelling)."""
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise _bad(f"{where} '{key}' must be true or false, got {_show(value)}", "bad_request")
    return value


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_infer_request(body: bytes, header_length: str | None, max_values: int | None = None) -> tuple[dict, bytes]:
    """Split a request into its JSON header and the binary tensor data that follows it (binary-data extension).

    ``max_values``: the most JSON values (counted by their separators, before parsing) a request may hold. Parsing
    holds the GIL, off the event loop or not: 14 million one-digit values took 1.1 s and stalled the probes, where
    the largest request a model takes (``pixels`` as JSON) has N x S x S x 3."""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit() and len(header_length) <= 12):
            raise _bad(f"{HEADER_LENGTH} must be an integer, got {_show(header_length)}", "bad_request")
        size = int(header_length)
        if not 0 < size <= len(body):
            raise _bad(f"{HEADER_LENGTH}={size} does not fit a body of {len(body)} bytes", "bad_request")
        head, binary = body[:size], body[size:]
    else:
        head, binary = body, b""
    if max_values is not None and head.count(b",") >= max_values:
        raise _bad(f"the inference request holds more than {max_values} JSON values, more than the largest request "
                   f"this model takes", "too_many_values", 413)
    request = strictjson.loads(head, "the inference request")
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise _bad("the inference request must be a JSON object with an 'inputs' list", "bad_request")
    return request, binary


def request_id(request: dict) -> str | None:
    """The request's ``id``, echoed in the answer: a string of valid Unicode (the parser saw to that), bounded."""
    value = request.get("id")
    if value is not None and not isinstance(value, str):
        raise _bad(f"'id' must be a string, got {_kind(value)}", "bad_request")
    if value is not None and len(value) > MAX_ID_CHARS:
        raise _bad(f"'id' is longer than {MAX_ID_CHARS} characters", "bad_request")
    return value


def _shape(tensor: dict, name: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_natural(d) for d in shape):
        raise _bad(f"input {_show(name)}: 'shape' must be a list of at most {MAX_DIMS} non-negative integers, got "
                   f"{_show(shape) if not isinstance(shape, list) else [_show(d) for d in shape[:MAX_DIMS + 1]]}")
    return shape


def _flatten(data: Any, limit: int) -> list:
    """The scalars of (nested) JSON arrays, in order; stops once past ``limit`` (a flood is refused, not walked).
    Recursion is safe: the parser bounds the depth."""
    flat: list = []

    def visit(node: Any) -> None:
        if len(flat) > limit:
            return
        if not isinstance(node, list):
            flat.append(node)
        elif node and not isinstance(node[0], list):  # an innermost row: one C-level extend (a stray list in it
            flat.extend(node)                        # fails the caller's element type check)
        else:
            for item in node:
                visit(item)

    visit(data)
    return flat


def _split_bytes_elements(raw: bytes, count: int, name: str) -> list[bytes]:
    """BYTES tensor in binary form: each element a 4-byte little-endian length, then its bytes. Reads ``count``
    elements at most: 32 MB of zero-length elements is refused after ``count``, not split into 8 million."""
    elements, offset = [], 0
    while offset < len(raw) and len(elements) < count:
        if offset + 4 > len(raw):
            raise _bad(f"input {name!r}: truncated BYTES element length at offset {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise _bad(f"input {name!r}: BYTES element {len(elements)} declares {length} bytes, only "
                       f"{len(raw) - offset} remain")
        elements.append(raw[offset:offset + length])
        offset += length
    if offset < len(raw):
        raise _bad(f"input {name!r}: shape says {count} elements, the data holds more")
    if len(elements) != count:
        raise _bad(f"input {name!r}: shape says {count} elements, the data holds {len(elements)}")
    return elements


def _declared_binary(tensor: dict, name: str, binary: bytes) -> bytes | None:
    """The input's binary data (binary-data extension), None when it comes as JSON ``data``; the two must agree."""
    parameters = _object(tensor.get("parameters"), f"input {_show(name)}: 'parameters'")
    binary_size = parameters.get("binary_data_size")
    if binary_size is not None:
        if not _natural(binary_size) or binary_size != len(binary):
            raise _bad(f"input {_show(name)}: binary_data_size {_show(binary_size)} does not match the {len(binary)} "
                       f"bytes after the JSON header")
        if "data" in tensor:
            raise _bad(f"input {_show(name)}: give either 'data' or binary data, not both")
        return binary
    if binary:
        raise _bad(f"{len(binary)} bytes follow the JSON header but no input declares binary_data_size")
    if "data" not in tensor:
        raise _bad(f"input {_show(name)} has no 'data' and no binary data")
    return None


def _at_most(images: int, max_images: int) -> None:
    if images > max_images:
        raise ServiceError(413, "too_many_images", f"at most {max_images} images per request, got {images}")


def _image_files(tensor: dict, count: int, binary: bytes | None) -> list[bytes]:
    """The encoded files of an ``images`` input: length-prefixed binary elements, or base64 strings in JSON."""
    if binary is not None:
        return _split_bytes_elements(binary, count, "images")
    elements = _flatten(tensor["data"], count)
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
    count = shape[0]
    if count == 0:
        raise _bad("input 'images' is empty: send at least one image")
    _at_most(count, max_images)
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
    values = _flatten(tensor["data"], count)
    if len(values) != count:
        held = "more" if len(values) > count else len(values)
        raise _bad(f"input 'pixels': shape {shape} needs {count} values, 'data' holds {held}")
    if set(map(type, values)) != {int}:  # bool, float, str, null, array: not a UINT8 (one C-level pass)
        raise _bad("input 'pixels': UINT8 values must be integers 0-255")
    try:
        array = np.asarray(values, np.int64)
    except OverflowError:  # an integer past 64 bits
        array = None
    if array is None or array.min() < 0 or array.max() > 255:
        raise _bad("input 'pixels': UINT8 values must be integers 0-255")
    return array.astype(np.uint8).reshape(shape)


def read_input(request: dict, binary: bytes, size: int, max_images: int) -> tuple[str, Any]:
    """The one input tensor: ("images", [(label, bytes)]) or ("pixels", uint8 array [N, size, size, 3])."""
    inputs = request["inputs"]
    expected = f"'images' (BYTES [N]) or 'pixels' (UINT8 [N,{size},{size},3])"
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"expected exactly one input, {expected}; got {len(inputs)}")
    tensor = inputs[0]
    name, datatype = tensor.get("name"), tensor.get("datatype")
    for field, value in (("name", name), ("datatype", datatype)):
        if not isinstance(value, str):
            raise _bad(f"input '{field}' must be a string, got {_kind(value)}")
    shape = _shape(tensor, name)
    data = _declared_binary(tensor, name, binary)
    if name == "images" and datatype == "BYTES":
        return "images", _images_input(tensor, shape, data, max_images)
    if name == "pixels" and datatype == "UINT8":
        return "pixels", _pixels_input(tensor, shape, data, size, max_images)
    raise _bad(f"expected {expected}; got {_show(name)} ({_show(datatype)} {shape})")


def _requested(output: Any, names: tuple[str, ...], binary: bool, num_classes: int) -> tuple[str, bool, int]:
    """One entry of ``outputs``: (name, binary?, classification k or 0)."""
    if not isinstance(output, dict):
        raise _bad(f"each requested output must be an object, got {_kind(output)}")
    name = output.get("name")
    if name not in names:
        raise _bad(f"unknown output {_show(name)}: this model has {', '.join(map(repr, names))}")
    options = _object(output.get("parameters"), f"output {name!r}: 'parameters'")
    k = options.get("classification", 0)
    if not _natural(k):
        raise _bad(f"'classification' must be a non-negative integer, got {_show(k)}")
    if k and name != OUTPUT:
        raise _bad(f"'classification' applies to {OUTPUT!r} only, not {name!r}")
    return name, _flag(options, "binary_data", f"output {name!r}: parameter", binary), min(k, num_classes)


def requested_outputs(request: dict, num_classes: int, has_cam: bool = False) -> tuple[tuple[tuple[str, bool], ...],
                                                                                         int]:
    """((name, binary?) per requested output, in request order; classification k or 0) from the request's
    ``outputs`` and ``parameters``. ``cam`` is an output only of a model whose graphs compute the map."""
    parameters = _object(request.get("parameters"), "the request's 'parameters'")
    binary = _flag(parameters, "binary_data_output", "the request's parameter")
    outputs = request.get("outputs")
    if outputs is None:
        return ((OUTPUT, binary),), 0
    names = (OUTPUT, CAM) if has_cam else (OUTPUT,)
    if not isinstance(outputs, list) or not 1 <= len(outputs) <= len(names):
        raise _bad(f"expected at most {'one requested output' if len(names) == 1 else 'two requested outputs'}, "
                   f"of {', '.join(map(repr, names))}")
    chosen = [_requested(output, names, binary, num_classes) for output in outputs]
    if len({name for name, _, _ in chosen}) < len(chosen):
        raise _bad("an output is requested twice")
    return tuple((name, flag) for name, flag, _ in chosen), max(k for _, _, k in chosen)


@dataclass(frozen=True)
class InferRequest:
    """A parsed, checked ``/v2/.../infer`` request: its one input, the outputs asked for, the id to echo."""

    kind: str  # "images": [(label, file bytes)]; "pixels": uint8 [N, S, S, 3]
    value: Any
    k: int  # classification extension: top-k labels, 0 for probabilities
    outputs: tuple[tuple[str, bool], ...]  # (name, binary-data extension?) per output, in the request's order
    id: str | None

    @property
    def binary(self) -> bool:
        return any(flag for _, flag in self.outputs)

    @property
    def cam(self) -> bool:
        return any(name == CAM for name, _ in self.outputs)


def parse_infer(body: bytes, header_length: str | None, image_size: int, max_images: int,
                num_classes: int, has_cam: bool = False) -> InferRequest:
    """The whole request, checked; only :class:`ServiceError` escapes (tests/test_hostile_http.py fuzzes it)."""
    max_values = max_images * image_size * image_size * 3 + STRUCTURE_VALUES
    request, binary = parse_infer_request(body, header_length, max_values)
    kind, value = read_input(request, binary, image_size, max_images)
    outputs, k = requested_outputs(request, num_classes, has_cam)
    return InferRequest(kind, value, k, outputs, request_id(request))


async def parse_infer_off_loop(body: bytes, *args: Any) -> InferRequest:
    """:func:`parse_infer`, on a worker thread for a large body: a 30 MB JSON body took 3.7 s to parse, and the
    event loop answered nothing meanwhile, probes included."""
    if len(body) <= OFFLOAD_BYTES:
        return parse_infer(body, *args)
    return await anyio.to_thread.run_sync(parse_infer, body, *args)


def _bytes_tensor(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _tensor(name: str, k: int, probabilities: np.ndarray, maps: np.ndarray | None,
            classes: list[str]) -> tuple[dict[str, Any], bytes, list]:
    """One output: its description, its binary payload and its JSON data."""
    n = len(probabilities)
    if name == CAM:
        return ({"name": CAM, "datatype": "FP32", "shape": list(maps.shape)},
                np.ascontiguousarray(maps, "<f4").tobytes(), maps.ravel().tolist())
    if k:
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        labels = [f"{probabilities[i, j]:f}:{j}:{classes[j]}" for i in range(n) for j in order[i]]
        return ({"name": OUTPUT, "datatype": "BYTES", "shape": [n, k]},
                _bytes_tensor([label.encode() for label in labels]), labels)
    return ({"name": OUTPUT, "datatype": "FP32", "shape": [n, probabilities.shape[1]]},
            np.ascontiguousarray(probabilities, "<f4").tobytes(), probabilities.ravel().tolist())


def infer_response(model: str, version: str, request: InferRequest, probabilities: np.ndarray,
                   classes: list[str], maps: np.ndarray | None = None) -> Response:
    """The outputs in the request's order; binary ones after the JSON header, in that order (Triton's layout)."""
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": []}
    if request.id is not None:
        head["id"] = request.id
    blobs = []
    for name, binary in request.outputs:
        output, payload, data = _tensor(name, request.k, probabilities, maps, classes)
        if binary:
            output["parameters"] = {"binary_data_size": len(payload)}
            blobs.append(payload)
        else:
            output["data"] = data
        head["outputs"].append(output)
    if not blobs:
        return JSONResponse(head)
    header = json.dumps(head).encode()
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def _has_cam(manifest: Any, backend: str) -> bool:
    from transferkit.core.predictors import explaining_backend

    return explaining_backend(manifest, backend) is not None


class OpenInferenceProtocol:
    """The ``/v2`` endpoints, answering for the models of the service returned by ``get_entry``
    (service/models.py): each addressed by its name, optionally its version."""

    def __init__(self, get_entry: Callable, settings: ServiceSettings):
        self.get_entry, self.settings = get_entry, settings

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
    def model_for(service, name: str, version: str | None) -> Any:
        """The served model a path names (service/http.py's ``Entry``); 404 for a name or version not served, 503
        when its bundle could not be read (also the route guard's check, service/guard.py, before any metric is
        labelled with the path)."""
        entry = service.models.select(name)
        manifest = entry.manifest
        if manifest is None:
            raise unavailable(entry)
        if version is not None and version != manifest.version:
            raise ServiceError(404, "unknown_version", f"model {name!r} has version {manifest.version!r} "
                                                       f"only, not {_show(version)}")
        return entry

    @classmethod
    def model(cls, service, request: Request) -> Any:
        return cls.model_for(service, request.path_params["name"], request.path_params.get("version"))

    @staticmethod
    async def serving(entry) -> bool:
        """The model is ready (in the batched layout, in another process too)."""
        return entry.is_ready() and (await entry.describe()).get("state") == "ready"

    @staticmethod
    async def held_or_let_go(entry) -> bool:
        """For the server's readiness: the model is ready, or let go on purpose (evicted by the memory budget and
        loaded at its next request, or unloaded by an operator), as in-process layouts leave such models out."""
        return entry.is_ready() and (await entry.describe()).get("state") in ("ready", "reloading", "unloaded")

    async def server_metadata(self, request: Request) -> JSONResponse:
        return JSONResponse({"name": "transferkit", "version": transferkit.__version__, "extensions": EXTENSIONS})

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        service = self.get_entry()
        ready = service.is_ready() and all([await self.held_or_let_go(entry) for _, entry in service.models])
        return Response(status_code=200 if ready else 503)

    async def model_metadata(self, request: Request) -> JSONResponse:
        try:
            entry = self.model(self.get_entry(), request)
        except ServiceError as exc:  # not a rejected input: not counted
            return error_response(exc)
        manifest, size = entry.manifest, entry.manifest.image_size
        return JSONResponse({
            "name": request.path_params["name"], "versions": [manifest.version],
            "platform": PLATFORM[RUNTIME_BACKENDS[entry.backend].engine],
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "UINT8", "shape": [-1, size, size, 3]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(manifest.class_names)]},
                        *([{"name": CAM, "datatype": "FP32", "shape": [-1, *manifest.explain.resolution]}]
                          if _has_cam(manifest, entry.backend) else [])],
            "parameters": {"classes": manifest.class_names, "one_input_of": ["images", "pixels"]},
        })

    async def model_ready(self, request: Request) -> Response:
        try:
            entry = self.model(self.get_entry(), request)
        except ServiceError as exc:  # the protocol's readiness is a bare status, except for a model it does not know
            return error_response(exc) if exc.status == 404 else Response(status_code=503)
        return Response(status_code=200 if await self.serving(entry) else 503)

    async def infer(self, request: Request) -> Response:
        try:
            entry = self.model(self.get_entry(), request)
        except ServiceError as exc:
            return error_response(exc)
        manifest = entry.manifest
        try:
            body = await request.body()
            parsed = await parse_infer_off_loop(body, request.headers.get(HEADER_LENGTH), manifest.image_size,
                                                self.settings.max_images, len(manifest.class_names),
                                                _has_cam(manifest, entry.backend))
            maps = None
            if parsed.cam:
                probabilities, maps = await self.explain(entry, parsed.kind, parsed.value)
            else:
                probabilities = await self.classify(entry, parsed.kind, parsed.value)
            probabilities = checked_probabilities(probabilities)
        except Exception as exc:
            return error_for(exc, entry.name)
        metrics.predicted(entry.name, len(probabilities))
        return infer_response(request.path_params["name"], manifest.version, parsed, probabilities,
                              manifest.class_names, maps)

    @staticmethod
    async def classify(entry, kind: str, value: Any) -> np.ndarray:
        """The request's one input through the model: encoded images are decoded there, pixels go straight in."""
        if kind == "images":
            return await entry.infer_encoded(value)
        return await entry.infer_pixels(value)

    @staticmethod
    async def explain(entry, kind: str, value: Any) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, maps) of the request's one input (``cam`` requested)."""
        if kind == "images":
            return (await entry.explain_encoded(value))[:2]
        return await entry.explain_pixels(value)


def oip_routes(get_entry: Callable, settings: ServiceSettings) -> list[Route]:
    """The ``/v2`` routes, answering for the models of the entry service returned by ``get_entry``."""
    return OpenInferenceProtocol(get_entry, settings).routes()
