"""Hostile HTTP against the service (issue 25): malformed /v2 JSON, strict types and booleans, floods, unknown paths
and methods, bearer tokens, property-based fuzzing of the /v2 request parser, and what only a real ``bentoml serve``
shows: slow and oversized request heads, slow bodies, the metric series random paths add, one model version for
every worker.

Request-level checks run in-process (the service's own Starlette app and route guard, a stand-in entry that answers
without a model); connection-level ones against a real server.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import socket
import string
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from serving import InProcessService, Server, ready_server
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from transferkit.core.backends import Choice
from transferkit.core.errors import ServiceError, UsageError
from transferkit.service import guard as guard_module
from transferkit.service import strictjson
from transferkit.service.guard import RouteGuard, collect_routes
from transferkit.service.http import build_app
from transferkit.service.oip import InferRequest, OpenInferenceProtocol, infer_response, parse_infer
from transferkit.service.settings import ServiceSettings

SIDE, CLASSES, MAX_IMAGES = 32, ["0", "1", "7"], 4
MODEL = "digits-test"
INFER = f"/v2/models/{MODEL}/infer"
TOKEN = "s3cret-token_for.tests"
FUZZ_EXAMPLES = int(os.environ.get("TRANSFERKIT_FUZZ_EXAMPLES", "500"))  # each parser test: ~5 s


# --- an in-process service: the real app and guard, a stand-in entry --------------------------------------------


class StandInEntry:
    """What the routes need from a served model, answering a uniform distribution without a model."""

    name, backend, choice = MODEL, "onnx", Choice("onnx", "test")
    manifest = SimpleNamespace(name=MODEL, version="v1", image_size=SIDE, class_names=CLASSES, backbone="MobileNetV2",
                               formats={}, validation=None, explain=None)
    load_error = None

    async def infer_encoded(self, images: list[tuple[str, bytes]]) -> np.ndarray:
        return np.full((len(images), len(CLASSES)), 1 / len(CLASSES), np.float32)

    async def infer_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return np.full((len(pixels), len(CLASSES)), 1 / len(CLASSES), np.float32)

    async def describe(self) -> dict:
        return {"state": "ready"}

    def is_ready(self) -> bool:
        return True


def in_process(token: bytes | None = None, protect_metrics: bool = False, rejected: list | None = None,
               entry=None) -> TestClient:
    """The service's app inside the route guard, with probes and /metrics as BentoML adds them."""
    service = InProcessService(entry or StandInEntry())
    settings = ServiceSettings(max_images=MAX_IMAGES)
    app = build_app(lambda: service, settings, settings.plan(cores=2, gpus=0))

    async def ok(request):
        return PlainTextResponse("ok")

    bento = Starlette(routes=[Route("/livez", ok), Route("/readyz", ok), Route("/metrics", ok), Mount("/", app)])

    def check(params: dict[str, str]) -> None:
        OpenInferenceProtocol.model_for(service, params["name"], params.get("version"))

    guarded = RouteGuard(bento, collect_routes(bento.routes), check_params=check, max_head_bytes=16 * 1024,
                         token=token, protect_metrics=protect_metrics,
                         on_reject=(rejected if rejected is not None else []).append)
    return TestClient(guarded, raise_server_exceptions=True)


@pytest.fixture(scope="module")
def client() -> TestClient:
    return in_process()


def pixels_request(**extra) -> dict:
    return {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, SIDE, SIDE, 3],
                        "data": [7] * (SIDE * SIDE * 3)}], **extra}


def parse(body: bytes, header_length: str | None = None) -> InferRequest:
    return parse_infer(body, header_length, SIDE, MAX_IMAGES, len(CLASSES))


def refusal(body: bytes, header_length: str | None = None) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        parse(body, header_length)
    assert 400 <= info.value.status < 500, info.value
    return info.value


# --- strict JSON ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,fragment", [
    (b'{"id": NaN}', "NaN"), (b'{"id": Infinity}', "Infinity"), (b'{"id": -Infinity}', "-Infinity"),
    (b'{"x": [1e999]}', "finite"), (b'{"x": -1e400}', "finite"),
    (b'{"id": "\\ud800"}', "surrogate"), (b'{"id": "a\\udc00b"}', "surrogate"), (b'{"\\udbff": 1}', "surrogate"),
    (b'{"id": "\xed\xa0\x80"}', "UTF-8"),  # a surrogate's raw UTF-8, which json.loads(bytes) lets through
    ('{"id": "x"}'.encode("utf-16"), "UTF-8"), (b'{"id": "\xff"}', "UTF-8"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b"[" * 33 + b"]" * 33, "deep"), (b'{"a":' * 40 + b"1" + b"}" * 40, "deep"), (b"[" * 100_000, "deep"),
    (b"{not json", "not valid JSON"), (b'{"x": ' + b"1" * 5000 + b"}", "not valid JSON"),
])
def test_strict_json_refuses_what_i_json_forbids(text, fragment):
    with pytest.raises(ServiceError) as info:
        strictjson.loads(text)
    assert info.value.status == 400 and info.value.reason == "bad_request"
    assert fragment in info.value.message


def test_strict_json_accepts_what_it_allows():
    assert strictjson.loads(b'{"id": "\\ud83d\\ude00"}') == {"id": "\U0001f600"}  # a surrogate pair: valid
    assert strictjson.loads(b'{"id": "\\\\ud800"}') == {"id": "\\ud800"}  # an escaped backslash, then text
    assert strictjson.loads(b"[" * 32 + b"]" * 32) is not None
    assert strictjson.loads(b'["[[[[' + b"[" * 100 + b'"]') == ["[[[[" + "[" * 100]  # brackets in strings
    assert strictjson.loads(b'{"x": [1.5, -0.0, 12345678901234567890]}') == {"x": [1.5, -0.0, 12345678901234567890]}


def test_depth_is_measured_on_the_bytes_without_parsing():
    assert strictjson.depth(b'{"a": [[1], {"b": [2]}]}') == 4
    assert strictjson.depth(b'{"a\\"[[[": "]]]{{{"}') == 1
    start = time.perf_counter()
    assert strictjson.depth(b"[" * 5_000_000) == 5_000_000
    assert time.perf_counter() - start < 2


# --- every field of the /v2 infer request --------------------------------------------------------------------------


def _with(path: tuple, value) -> bytes:
    request = pixels_request()
    target = request
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(request).encode()


@pytest.mark.parametrize("path,value,fragment", [
    (("id",), 7, "'id' must be a string"), (("id",), ["r"], "'id' must be a string"),
    (("id",), {"r": 1}, "'id' must be a string"), (("id",), "r" * 1025, "longer than 1024"),
    (("parameters",), [1], "'parameters' must be a JSON object"), (("parameters",), "x", "must be a JSON object"),
    (("parameters",), {"binary_data_output": "false"}, "must be true or false, got 'false'"),
    (("parameters",), {"binary_data_output": 0}, "must be true or false"),
    (("parameters",), {"binary_data_output": None}, "must be true or false"),
    (("inputs",), {"name": "pixels"}, "'inputs' list"), (("inputs",), "pixels", "'inputs' list"),
    (("inputs",), [], "exactly one input"), (("inputs",), ["pixels"], "exactly one input"),
    (("inputs", 0, "name"), 5, "'name' must be a string"), (("inputs", 0, "datatype"), None, "must be a string"),
    (("inputs", 0, "datatype"), ["UINT8"], "must be a string"),
    (("inputs", 0, "shape"), "1,32,32,3", "'shape' must be a list"),
    (("inputs", 0, "shape"), [1.0, 32, 32, 3], "shape"),
    (("inputs", 0, "shape"), [True, 32, 32, 3], "shape"), (("inputs", 0, "shape"), [-1, 32, 32, 3], "shape"),
    (("inputs", 0, "shape"), [1] * 9, "at most 8"), (("inputs", 0, "shape"), [[1], 32, 32, 3], "shape"),
    (("inputs", 0, "parameters"), [1], "'parameters' must be a JSON object"),
    (("inputs", 0, "parameters"), {"binary_data_size": "3072"}, "binary_data_size"),
    (("inputs", 0, "parameters"), {"binary_data_size": True}, "binary_data_size"),
    (("inputs", 0, "data"), [True] * 3072, "integers 0-255"), (("inputs", 0, "data"), [7.0] * 3072, "0-255"),
    (("inputs", 0, "data"), ["7"] * 3072, "integers 0-255"), (("inputs", 0, "data"), [None] * 3072, "0-255"),
    (("inputs", 0, "data"), [2**70] * 3072, "0-255"), (("inputs", 0, "data"), [-1] * 3072, "0-255"),
    (("inputs", 0, "data"), {"0": 7}, "needs 3072 values"), (("inputs", 0, "data"), [7] * 3073, "holds more"),
    (("outputs",), {"name": "probabilities"}, "at most one requested output"),
    (("outputs",), [{"name": 3}], "unknown output 3"), (("outputs",), [{"name": "probabilities"}] * 2, "at most one"),
    (("outputs",), [{"name": "probabilities", "parameters": "x"}], "'parameters' must be a JSON object"),
    (("outputs",), [{"name": "probabilities", "parameters": {"classification": "2"}}], "non-negative integer"),
    (("outputs",), [{"name": "probabilities", "parameters": {"classification": True}}], "non-negative integer"),
    (("outputs",), [{"name": "probabilities", "parameters": {"binary_data": "true"}}], "must be true or false"),
])
def test_every_field_of_the_infer_request_has_its_json_type_checked(client, path, value, fragment):
    error = refusal(_with(path, value))
    assert fragment in error.message, error.message
    response = client.post(INFER, content=_with(path, value))
    assert response.status_code == 400 and fragment in response.json()["error"], response.text


def test_strict_booleans_decide_the_binary_extension(client):
    as_json = client.post(INFER, json=pixels_request(parameters={"binary_data_output": False}))
    assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
    binary = client.post(INFER, json=pixels_request(parameters={"binary_data_output": True}))
    assert binary.status_code == 200 and binary.headers["content-type"] == "application/octet-stream"
    per_output = pixels_request(parameters={"binary_data_output": True},
                                outputs=[{"name": "probabilities", "parameters": {"binary_data": False}}])
    assert client.post(INFER, json=per_output).headers["content-type"] == "application/json"


@pytest.mark.parametrize("request_id", ["r-1", "ключ-🙂", "", "x" * 1024])
def test_the_id_is_echoed_only_as_a_valid_bounded_string(client, request_id):
    response = client.post(INFER, json=pixels_request(id=request_id))
    assert response.status_code == 200 and response.json()["id"] == request_id
    for bad in (b'"\\ud800"', b"NaN", b"1e999", b"[1, 2]", b'{"a": 1}', b"12"):
        body = json.dumps(pixels_request()).encode()[:-1] + b', "id": ' + bad + b"}"
        response = client.post(INFER, content=body)
        assert response.status_code == 400 and response.json()["reason"] == "bad_request", (bad, response.text)


def test_messages_never_echo_a_whole_value(client):
    for tensor in ({"name": "x" * 1_000_000, "datatype": "UINT8", "shape": [1], "data": [1]},
                   {"name": "x" * 1_000_000, "datatype": "UINT8", "shape": "x" * 1_000_000},
                   {"name": "x" * 1_000_000, "datatype": "UINT8", "shape": [1], "parameters": {"binary_data_size": 9}},
                   {"name": "pixels", "datatype": "x" * 1_000_000, "shape": [1], "data": [1]}):
        response = client.post(INFER, content=json.dumps({"inputs": [tensor]}).encode())
        assert response.status_code == 400 and len(response.content) < 400, len(response.content)
    response = client.post(INFER, content=_with(("inputs", 0, "shape"), [[[1] * 5_000]] + [32, 32, 3]))
    assert response.status_code == 400 and len(response.content) < 400, len(response.content)


def test_floods_are_refused_without_being_walked(client):
    """Work is bounded by what a request may hold, not by what the bytes claim (the /v2 half of the issue's 4.6 s
    flood of zero-length BYTES elements, and a 30 MB body of one-digit values)."""
    flood = b"\x00\x00\x00\x00" * (8 * 1024 * 1024)  # 8 M zero-length elements for a [1] tensor
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(flood)}}]}).encode()
    values = b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [' + \
        b"1," * 14_000_000 + b"1]}]}"
    def strings(count: int) -> bytes:
        return json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                       "data": [["QQ=="] * 100] * (count // 100)}]}).encode()

    for body, header, status, fragment in [(head + flood, str(len(head)), 400, "holds more"),
                                           (values, None, 413, "JSON values"), (strings(2_000_000), None, 413, "JSON"),
                                           (strings(10_000), None, 400, "expected 1 base64 strings")]:
        start = time.perf_counter()
        error = refusal(body, header)
        assert (error.status, fragment in error.message) == (status, True), error.message
        assert time.perf_counter() - start < 1.5, fragment


@pytest.mark.parametrize("header", ["abc", "-5", "+5", "1_0", " 5", "5" * 20, "١٢"])
def test_the_header_length_must_be_plain_digits(header):
    assert "Inference-Header-Content-Length" in refusal(b'{"inputs": []}', header).message


# --- the route guard -----------------------------------------------------------------------------------------------


def test_unknown_paths_and_models_are_404_before_the_app():
    rejected: list[str] = []
    client = in_process(rejected=rejected)
    for path in ["/nope", "/predict/", "/v2/models", "/static_content/x.js", "/v2/models/digits-test/infer/x",
                 "/%00", "/" + "a" * 5000]:
        response = client.get(path)
        assert response.status_code == 404 and response.json()["reason"] == "not_found", (path, response.text)
        assert len(response.content) < 300
    response = client.post("/v2/models/other/infer", content=b"x" * 1000)
    assert response.status_code == 404 and response.json()["reason"] == "unknown_model"
    assert "digits-test" in response.json()["error"] and response.headers["connection"] == "close"
    response = client.get("/v2/models/digits-test/versions/v9/ready")
    assert response.status_code == 404 and response.json()["reason"] == "unknown_version"
    assert client.get("/v2/models/digits-test/versions/v1/ready").status_code == 200
    assert rejected == ["not_found"] * 7  # the model checks are the routes' answers, not counted as before


def test_wrong_methods_are_405_before_the_body_is_read():
    client = in_process()
    for method, path in [("POST", "/livez"), ("PUT", "/readyz"), ("POST", "/metrics"), ("DELETE", "/predict"),
                         ("GET", INFER), ("POST", "/metadata"), ("PATCH", "/v2/health/ready")]:
        response = client.request(method, path, content=b"x" * 100_000)
        assert response.status_code == 405 and response.json()["reason"] == "method_not_allowed", (method, path)
        assert response.headers["connection"] == "close" and response.headers["allow"]
    assert client.head("/livez").status_code == 200 and client.get("/metrics").status_code == 200


def test_an_oversized_head_is_431():
    client = in_process()
    response = client.get("/livez", headers={"X-Big": "a" * 20_000})
    assert response.status_code == 431 and response.json()["reason"] == "headers_too_large"
    assert response.headers["connection"] == "close"
    assert client.get("/livez", headers={"X-Fine": "a" * 8_000}).status_code == 200


def test_a_bearer_token_guards_everything_but_the_probes(monkeypatch):
    compared = []
    original = guard_module.hmac.compare_digest
    monkeypatch.setattr(guard_module.hmac, "compare_digest", lambda a, b: compared.append(1) or original(a, b))
    rejected: list[str] = []
    client = in_process(token=TOKEN.encode(), rejected=rejected)
    good = {"Authorization": f"Bearer {TOKEN}"}
    for path in ["/livez", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"]:
        assert client.get(path).status_code == 200, path
    for method, path in [("GET", "/metadata"), ("POST", "/predict"), ("GET", "/v2"), ("GET", f"/v2/models/{MODEL}"),
                         ("POST", INFER), ("GET", f"/v2/models/{MODEL}/ready")]:
        missing = client.request(method, path)
        assert missing.status_code == 401 and missing.json()["reason"] == "unauthorized", path
        assert missing.headers["www-authenticate"] == 'Bearer realm="transferkit"'
        wrong = client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}x"})
        assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
        assert TOKEN not in wrong.text
    assert client.get("/metadata", headers={"Authorization": "Basic " + TOKEN}).status_code == 401
    assert client.get("/metadata", headers=good).status_code == 200
    assert client.get("/metadata", headers={"Authorization": f"bearer  {TOKEN} "}).status_code == 200
    assert client.post(INFER, json=pixels_request(), headers=good).status_code == 200
    assert compared and set(rejected) == {"unauthorized"}
    protected = in_process(token=TOKEN.encode(), protect_metrics=True)
    assert protected.get("/metrics").status_code == 401 and protected.get("/metrics", headers=good).status_code == 200
    assert protected.get("/livez").status_code == 200


def test_the_token_comes_from_the_variable_or_a_file(monkeypatch, tmp_path):
    for name in ("TRANSFERKIT_API_TOKEN", "TRANSFERKIT_API_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert ServiceSettings.from_env().bearer_token() is None
    monkeypatch.setenv("TRANSFERKIT_API_TOKEN", TOKEN)
    settings = ServiceSettings.from_env()
    assert settings.bearer_token() == TOKEN.encode() and TOKEN not in repr(settings)
    assert TOKEN not in json.dumps(settings.public(), default=str)
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")  # as `docker secret` and Kubernetes write one
    monkeypatch.setenv("TRANSFERKIT_API_TOKEN_FILE", str(secret))
    with pytest.raises(UsageError, match="not both"):
        ServiceSettings.from_env().bearer_token()
    monkeypatch.delenv("TRANSFERKIT_API_TOKEN")
    assert ServiceSettings.from_env().bearer_token() == TOKEN.encode()
    for content in ("", "\n", "two words"):
        secret.write_text(content)
        with pytest.raises(UsageError, match="TRANSFERKIT_API_TOKEN_FILE"):
            ServiceSettings.from_env().bearer_token()
    secret.unlink()
    with pytest.raises(UsageError, match="cannot read"):
        ServiceSettings.from_env().bearer_token()


# --- fuzzing the /v2 request parser --------------------------------------------------------------------------------

KEYS = ["id", "parameters", "inputs", "outputs", "name", "datatype", "shape", "data", "binary_data_size",
        "binary_data_output", "binary_data", "classification"]
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=12) | st.sampled_from(["images", "pixels", "BYTES", "UINT8", "probabilities", "QQ=="]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4),
                      max_leaves=24)
SHAPES = st.lists(st.integers(-1, 40), max_size=5) | st.sampled_from([[1], [2, 1], [1, SIDE, SIDE, 3]]) | VALUES
TENSORS = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["images", "pixels"]) | VALUES, "datatype": st.sampled_from(["BYTES", "UINT8"]) | VALUES,
    "shape": SHAPES, "data": VALUES | st.lists(st.integers(0, 255), max_size=8),
    "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-1, 64) | VALUES}) | VALUES})
OUTPUTS = st.lists(st.fixed_dictionaries({}, optional={
    "name": st.just("probabilities") | VALUES,
    "parameters": st.fixed_dictionaries({}, optional={"classification": st.integers(-1, 5) | VALUES,
                                                      "binary_data": VALUES}) | VALUES}), max_size=2) | VALUES
REQUESTS = st.fixed_dictionaries({"inputs": st.lists(TENSORS, max_size=2) | VALUES}, optional={
    "id": VALUES, "outputs": OUTPUTS,
    "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": VALUES}) | VALUES})
# Tokens Python's json accepts or that break parsers, spliced into valid JSON text.
SPLICES = st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b'"\\ud800"', b'"\\udfff"', b"[" * 40,
                           b"{" * 40, b'"\xed\xa0\x80"', b"\xff", b"\x00", b'"a":1,"a":2', b"1" * 5000, b"]", b"}"])


@st.composite
def valid_requests(draw) -> tuple[dict, bytes]:
    """A request the service must answer: either input, JSON or binary data, optional id, outputs and flags."""
    count = draw(st.integers(1, MAX_IMAGES))
    kind = draw(st.sampled_from(["images", "pixels"]))
    binary = draw(st.booleans())
    if kind == "images":
        files = [draw(st.binary(min_size=1, max_size=24)) for _ in range(count)]
        tensor = {"name": "images", "datatype": "BYTES", "shape": draw(st.sampled_from([[count], [count, 1]]))}
        payload = b"".join(len(f).to_bytes(4, "little") + f for f in files)
        data = [base64.b64encode(f).decode() for f in files]
    else:
        pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (count, SIDE, SIDE, 3))
        tensor = {"name": "pixels", "datatype": "UINT8", "shape": [count, SIDE, SIDE, 3]}
        payload = pixels.astype(np.uint8).tobytes()
        data = pixels.tolist() if draw(st.booleans()) else pixels.ravel().tolist()
    if binary:
        tensor["parameters"] = {"binary_data_size": len(payload)}
    else:
        tensor["data"] = data
    request: dict = {"inputs": [tensor]}
    if draw(st.booleans()):
        request["id"] = draw(st.text(max_size=16))
    if draw(st.booleans()):
        request["parameters"] = {"binary_data_output": draw(st.booleans())}
    if draw(st.booleans()):
        options = draw(st.fixed_dictionaries({}, optional={"classification": st.integers(0, 5),
                                                           "binary_data": st.booleans()}))
        request["outputs"] = [{"name": "probabilities", "parameters": options}]
    return request, payload if binary else b""


def _positions(node, at: tuple = ()):
    """Every place in a request a mutation can hit (tensor data is one place, not thousands)."""
    yield at
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _positions(value, (*at, key))
    elif isinstance(node, list) and len(node) <= MAX_IMAGES * 2:
        for index, value in enumerate(node):
            yield from _positions(value, (*at, index))


@st.composite
def mutated_requests(draw) -> tuple[bytes, bytes]:
    """A valid request with one to three fields replaced, removed or added: every check gets reached."""
    request, payload = draw(valid_requests())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(list(_positions(request))))
        if not at:
            continue
        parent = request
        for key in at[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":
            parent[at[-1]] = draw(VALUES)
        elif action == "remove":
            del parent[at[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = draw(VALUES)
    return json.dumps(request).encode(), payload


FUZZ = hypothesis_settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                           suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_refused_or_parsed(body: bytes, header: str | None) -> None:
    """The property: a parsed request can be answered (its echo serialises), anything else is a 4xx ServiceError."""
    try:
        request = parse(body, header)
    except ServiceError as exc:
        event(f"refused: {exc.reason}")  # --hypothesis-show-statistics: how deep the examples reach
        assert 400 <= exc.status < 500 and exc.reason and len(exc.message) < 1000, exc
        json.dumps({"error": exc.message, "reason": exc.reason}, ensure_ascii=False).encode("utf-8")
        return
    event(f"parsed: {request.kind}, binary output {request.binary}")
    assert request.kind in ("images", "pixels") and 1 <= len(request.value) <= MAX_IMAGES
    probabilities = np.full((len(request.value), len(CLASSES)), 1 / len(CLASSES), np.float32)
    response = infer_response(MODEL, "v1", request, probabilities, CLASSES)  # renders the body: echo included
    assert response.status_code == 200 and response.body


@FUZZ
@given(case=valid_requests())
def test_fuzz_valid_requests_are_answered(case):
    request, payload = case
    head = json.dumps(request).encode()
    parsed = parse(head + payload, str(len(head)) if payload else None)
    tensor = request["inputs"][0]
    assert (parsed.kind, len(parsed.value), parsed.id) == (tensor["name"], tensor["shape"][0], request.get("id"))
    assert_refused_or_parsed(head + payload, str(len(head)) if payload else None)


@FUZZ
@given(case=mutated_requests(), header=st.sampled_from(["exact", None, "junk"]))
def test_fuzz_mutated_requests(case, header):
    head, payload = case
    length = {"exact": str(len(head)), "junk": "x1", None: None}[header]
    assert_refused_or_parsed(head + (payload if length else b""), length)


@FUZZ
@given(request=REQUESTS, binary=st.binary(max_size=64), header=st.sampled_from(["exact", None, "junk", "0"]))
def test_fuzz_structured_requests(request, binary, header):
    head = json.dumps(request).encode()
    length = {"exact": str(len(head)), "junk": "x1", "0": "0", None: None}[header]
    assert_refused_or_parsed(head + (binary if length else b""), length)


@FUZZ
@given(request=REQUESTS, splice=SPLICES, where=st.floats(0, 1))
def test_fuzz_spliced_json_text(request, splice, where):
    head = json.dumps(request).encode()
    cut = int(len(head) * where)
    assert_refused_or_parsed(head[:cut] + splice + head[cut:], None)


@FUZZ
@given(body=st.binary(max_size=512), header=st.none() | st.text(max_size=8))
def test_fuzz_bytes(body, header):
    assert_refused_or_parsed(body, header)


@hypothesis_settings(max_examples=max(20, FUZZ_EXAMPLES // 5), deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=mutated_requests(), splice=st.none() | SPLICES, where=st.floats(0, 1))
def test_fuzz_the_http_answers_only_4xx_json_or_200(client, case, splice, where):
    """Through the app: the answer to anything is 200 or the error JSON with a 4xx, never a 500 or a reset."""
    head, payload = case
    cut = int(len(head) * where)
    body = head if splice is None else head[:cut] + splice + head[cut:]
    headers = {"Inference-Header-Content-Length": str(len(body))} if payload else {}
    response = client.post(INFER, content=body + payload, headers=headers)
    assert response.status_code in (200, 400, 413), response.text
    size = response.headers.get("Inference-Header-Content-Length")  # a binary answer: its JSON head first
    body = json.loads(response.content[:int(size)]) if size else response.json()
    assert ("outputs" in body) if response.status_code == 200 else set(body) == {"error", "reason"}


# --- a real server: connection hygiene, metric series ---------------------------------------------------------------

HEAD_TIMEOUT_S = 2
REQUEST_TIMEOUT_S = 4


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    secret = tmp_path_factory.mktemp("secrets") / "token"
    secret.write_text(TOKEN + "\n")
    # One worker: what it does to its own event loop shows in its probes' latency.
    with ready_server(bundle, tmp_path_factory.mktemp("logs") / "hostile.log", header_timeout_s=HEAD_TIMEOUT_S,
                      max_header_kb=8, timeout_s=REQUEST_TIMEOUT_S, max_images=MAX_IMAGES, workers=1,
                      env={"TRANSFERKIT_API_TOKEN_FILE": str(secret)}) as srv:
        yield srv


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def until_closed(sock: socket.socket, limit: float, trickle: bytes = b"", every: float = 0.5) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (``limit`` if it does not), and what it sent; sends ``trickle`` one
    byte at a time meanwhile."""
    start = last = time.monotonic()
    reply, pending = b"", list(trickle)
    sock.settimeout(0.1)
    while time.monotonic() - start < limit:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        except TimeoutError:
            pass
        except OSError:
            break
        if pending and time.monotonic() - last >= every:
            try:
                sock.sendall(bytes([pending.pop(0)]))
            except OSError:
                break
            last = time.monotonic()
    return time.monotonic() - start, reply


def test_idle_half_sent_and_slow_loris_heads_are_closed_at_the_head_deadline(server):
    """Before: a connection that sent nothing, half a head, or a header byte every 2 s was still open after 40 s (no
    head timeout in uvicorn; any byte cancels its keep-alive timer). Now: the head deadline, then 408."""
    cases = {"idle": b"", "half": b"GET /livez HTTP/1.1\r\nHost: x\r\n",
             "loris": b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: "}
    sockets = {name: socket.create_connection(("127.0.0.1", server.port), timeout=5) for name in cases}
    for name, first in cases.items():
        if first:
            sockets[name].sendall(first)
    with ThreadPoolExecutor(len(sockets)) as pool:  # watched at once: each from its opening
        futures = {name: pool.submit(until_closed, sock, 4 * HEAD_TIMEOUT_S, b"a" * 100 if name == "loris" else b"")
                   for name, sock in sockets.items()}
        results = {name: future.result() for name, future in futures.items()}
    for sock in sockets.values():
        sock.close()
    for name, (seconds, reply) in results.items():
        assert HEAD_TIMEOUT_S - 0.5 < seconds < HEAD_TIMEOUT_S + 2, (name, seconds)
        if name == "idle":
            assert reply == b""
        else:
            assert reply.startswith(b"HTTP/1.1 408 ") and b'"reason": "header_timeout"' in reply, (name, reply)
    assert server.get("/livez").status_code == 200


def test_an_idle_keep_alive_connection_outlives_a_retry_after_and_uvicorns_five_seconds(server):
    """A client that waited out a Retry-After (up to 30 s) or a load balancer's idle pool sends its next request on
    the connection it kept. With uvicorn's 5-s keep-alive the server had closed it, or was closing it just then (a
    reset at 128 users); now it stays open for TRANSFERKIT_KEEP_ALIVE_S (75 s)."""
    request = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        assert until_closed(sock, 0.5)[1].startswith(b"HTTP/1.1 200 ")  # the whole answer, head and body
        time.sleep(6.5)
        sock.sendall(request)
        seconds, reply = until_closed(sock, 1)
    assert reply.startswith(b"HTTP/1.1 200 ") and seconds >= 1, reply[:200]  # answered, and still open


def test_heads_over_the_cap_are_431_whole_or_in_pieces(server):
    whole = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(whole)
        seconds, reply = until_closed(sock, 5)
    assert reply.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in reply and seconds < 2, reply[:200]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.05)
        reply = b""
        for _ in range(20):  # 1 KB pieces until the server answers (sending on would only earn a reset)
            sock.sendall(b"X-Piece: " + b"a" * 1000 + b"\r\n")
            try:
                reply = sock.recv(65536)
                break
            except TimeoutError:
                pass
        reply += until_closed(sock, 5)[1]
    assert reply.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in reply, reply[:200]


def test_a_slow_body_counts_against_the_request_timeout_and_cannot_hold_the_connection(server):
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n"
            f"Authorization: Bearer {TOKEN}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head + b'{"inputs": [')
        start = time.monotonic()
        answered, reply = until_closed(sock, REQUEST_TIMEOUT_S + 2 * HEAD_TIMEOUT_S + 4, trickle=b"1," * 200,
                                       every=0.2)
    assert reply.startswith(b"HTTP/1.1 504 "), reply[:200]
    assert answered < REQUEST_TIMEOUT_S + 2 * HEAD_TIMEOUT_S + 2, answered  # then closed, trickle or not
    assert time.monotonic() - start > REQUEST_TIMEOUT_S - 0.5


def test_posts_to_probes_and_metrics_are_refused_before_their_body(server):
    for path in ("/livez", "/readyz", "/metrics"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 30000000\r\n\r\n".encode())
            sock.sendall(b"x" * 65536)  # a sliver of the declared 30 MB
            seconds, reply = until_closed(sock, 5)
        assert reply.startswith(b"HTTP/1.1 405 ") and b"method_not_allowed" in reply and seconds < 1.5, reply[:200]


def test_probes_answer_while_the_worker_takes_in_large_json_bodies(server):
    """Before: a 28 MB body of one-digit values was parsed on the event loop, and /livez waited 3.4 s. Now such a
    body is refused from its separators, and a large request is parsed on a thread."""
    flood = b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [' + \
        b"1," * 14_000_000 + b"1]}]}"
    files = [base64.b64encode(np.random.default_rng(i).bytes(5_000_000)).decode() for i in range(MAX_IMAGES)]
    large = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [MAX_IMAGES], "data": files}]})
    latencies: list[float] = []

    def probe_until(done) -> None:
        while not done.done():
            start = time.monotonic()
            assert requests.get(server.url + "/livez", timeout=30).status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)

    with ThreadPoolExecutor(2) as pool:
        for body, status in ((flood, 413), (large.encode(), 400)):
            posted = pool.submit(requests.post, server.url + INFER, data=body, headers=auth(), timeout=60)
            pool.submit(probe_until, posted).result()
            assert posted.result().status_code == status, posted.result().text
    assert len(latencies) > 3 and max(latencies) < 1.0, latencies


def test_the_token_guards_a_real_server_and_the_probes_stay_open(server):
    for path in ("/livez", "/readyz", "/v2/health/ready", "/metrics"):
        assert server.get(path).status_code == 200, path
    for path in ("/metadata", f"/v2/models/{MODEL}", "/v2"):
        response = server.get(path)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer"), path
        assert response.json()["reason"] == "unauthorized"
    assert server.get("/metadata", headers=auth()).json()["name"] == MODEL


def metric_series(server) -> set[tuple]:
    series = set()
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            series.add((sample.name, tuple(sorted(sample.labels.items()))))
    return series


def test_a_thousand_random_paths_add_no_metric_series(server):
    """Before: BentoML labelled its request metrics with every path (200 random paths: 4,000 new series)."""
    for _ in range(10):  # every worker has served once: their own first-request series exist before counting
        requests.get(server.url + "/metadata", headers=auth(), timeout=10)
    before = metric_series(server)
    rng = random.Random(25)
    session = requests.Session()
    alphabet = string.ascii_letters + string.digits + "-._~%"
    for i in range(1000):
        word = "".join(rng.choices(alphabet, k=rng.randint(1, 24)))
        path = [f"/{word}", f"/v2/models/{word}/infer", f"/v2/models/{MODEL}/versions/{word}", f"/predict/{word}",
                f"/static_content/{word}", f"/v2/{word}"][i % 6]
        method = ["GET", "POST", "PUT", "DELETE"][i % 4]
        response = session.request(method, server.url + path, data=b"x" if method != "GET" else None, timeout=10)
        assert response.status_code in (404, 405), (path, response.status_code)
    after = metric_series(server)
    assert after - before == set(), sorted(after - before)[:10]
    assert server.get("/readyz").status_code == 200


# --- one resolved version for every worker ------------------------------------------------------------------------


def _registered_copy(bundle: Path, dest: Path, name: str, version: str) -> str:
    from transferkit.core.manifest import read_manifest
    from transferkit.export.bundle import register_bundle

    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.update(name=name, version=version)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return register_bundle(dest, read_manifest(dest))


def _versions_by_worker(srv: Server, timeout: float = 90) -> dict[int, set[str]]:
    """The versions each worker answers /metadata with, asked until both workers have answered (a respawned one
    takes seconds to import the service and listen); concurrent new connections, so that both accept some."""

    def one(_) -> dict:
        return requests.get(srv.url + "/metadata", timeout=30, headers={"Connection": "close"}).json()

    seen: dict[int, set[str]] = {}
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(8) as pool:
        while len(seen) < 2 and time.monotonic() < deadline:
            for meta in pool.map(one, range(16)):
                seen.setdefault(meta["runtime"]["worker"], set()).add(meta["version"])
            time.sleep(0.2)
    return seen


def test_every_worker_serves_the_version_resolved_at_start(bundle, tmp_path):
    """Workers resolved ``NAME:latest`` each on their own: one respawned after a new export served the new version
    beside siblings serving the old. Now the arbiter resolves it once and every worker gets the exact tag."""
    import bentoml

    name = "pinned-test"
    _registered_copy(bundle, tmp_path / "v1", name, "v1")
    srv = Server(f"{name}:latest", tmp_path / "pinned.log", workers=2)
    try:
        srv.wait_ready()
        seen = _versions_by_worker(srv)
        assert len(seen) == 2 and set().union(*seen.values()) == {"v1"}, seen
        time.sleep(0.5)  # a later creation time: `latest` is v2 from here on
        _registered_copy(bundle, tmp_path / "v2", name, "v2")
        assert bentoml.models.get(f"{name}:latest").tag.version == "v2"
        victim = srv.workers("transferkit")[0]
        victim.kill()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = {p.pid for p in srv.workers("transferkit")}
            if len(pids) == 2 and victim.pid not in pids:
                break
            time.sleep(0.3)
        assert victim.pid not in pids and len(pids) == 2, "the killed worker was not respawned"
        srv.wait_ready()
        seen = _versions_by_worker(srv)
        assert len(seen) == 2 and set().union(*seen.values()) == {"v1"}, seen
    finally:
        srv.stop()
        for version in ("v1", "v2"):
            try:
                bentoml.models.delete(f"{name}:{version}")
            except Exception:
                pass
