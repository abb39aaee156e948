"""What an operator and a client developer use (issue 27): the OpenAPI document and Swagger page with every route,
per-request ``top_k`` on ``/predict``, the decode/queue/inference and images-per-request histograms and the
``transferkit_model_info`` gauge, and the httpx client examples in service/examples/.

Most checks run the service's own Starlette app in-process over the real test bundle, with the ``inprocess``
layout's model (service/local.py): the real ModelRuntime, decoding and classifying as one job on its compute
thread. What only ``bentoml serve`` shows (the document BentoML serves at ``/docs.json``, the page at ``/``,
the metrics as /metrics aggregates them over the worker processes) runs against one real server.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from serving import InProcessService, local_model, ready_server
from starlette.routing import Route
from starlette.testclient import TestClient

from transferkit.core.images import decode_image
from transferkit.core.manifest import read_manifest
from transferkit.service import openapi
from transferkit.service.decoding import decode_all
from transferkit.service.http import build_app
from transferkit.service.runtime import ModelRuntime
from transferkit.service.settings import ServiceSettings
from transferkit.training.rundir import split_files

EXAMPLES = Path(__file__).resolve().parents[1] / "service" / "examples"
CLASSES = ["0", "1", "7"]
MAX_IMAGES = 4
SERVER_TOP_K = 2  # the server's setting: fewer than the 3 classes, so that a request's own top_k shows


def example(name: str) -> ModuleType:
    """A client example, loaded from its file as a user runs it (the examples import nothing of transferkit)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def entry(bundle):
    return local_model(bundle)


@pytest.fixture(scope="module")
def app(entry):
    settings = ServiceSettings(max_images=MAX_IMAGES, top_k=SERVER_TOP_K)
    service = InProcessService(entry)
    return build_app(lambda: service, settings, settings.plan(cores=2, gpus=0))


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    return TestClient(app)  # an httpx.Client: the examples take it as they take one with a server's base_url


@pytest.fixture(scope="module")
def files(trained_run) -> list[tuple[str, bytes]]:
    return [(path.name, path.read_bytes()) for path, _ in split_files(trained_run.run_dir, "test")[:MAX_IMAGES]]


@pytest.fixture(scope="module")
def expected(bundle, files) -> np.ndarray:
    from transferkit.core.predictors import load_bundle

    return load_bundle(bundle).predictor("onnx")(np.stack([decode_image(data, 32) for _, data in files]))


def assert_labels(answer: dict, probabilities: np.ndarray, k: int) -> None:
    order = np.argsort(-probabilities, kind="stable")[:k]
    assert [item["label"] for item in answer["top_k"]] == [CLASSES[i] for i in order]
    assert [item["score"] for item in answer["top_k"]] == pytest.approx(probabilities[order], abs=1e-6)
    assert answer["label"] == CLASSES[order[0]]


# --- per-request top_k ---------------------------------------------------------------------------------------------


def test_top_k_per_request_by_query_or_form_field(client, files, expected):
    parts = [("images", (name, data, "image/png")) for name, data in files[:2]]
    cases = {"server setting": ({}, {}, SERVER_TOP_K), "query 1": ({"top_k": "1"}, {}, 1),
             "query 3": ({"top_k": "3"}, {}, 3), "form 3": ({}, {"top_k": "3"}, 3), "form 1": ({}, {"top_k": "1"}, 1)}
    for case, (params, data, k) in cases.items():
        response = client.post("/predict", files=parts, params=params, data=data)
        assert response.status_code == 200, (case, response.text)
        answers = response.json()
        assert len(answers) == 2 and all(len(answer["top_k"]) == k for answer in answers), case
        for answer, probabilities in zip(answers, expected):
            assert_labels(answer, probabilities, k)


@pytest.mark.parametrize("value", ["0", "4", "-1", "1.5", "2.0", "abc", "", " 2", "+2", "٣", "1e1", "9" * 30])
def test_bad_top_k_is_400_with_the_error_json(client, files, value):
    parts = [("images", (files[0][0], files[0][1], "image/png"))]
    before = REGISTRY.get_sample_value("transferkit_rejected_inputs_total", {"reason": "bad_top_k"}) or 0
    for params, data in (({"top_k": value}, {}), ({}, {"top_k": value})):
        response = client.post("/predict", files=parts, params=params, data=data)
        assert response.status_code == 400, (value, response.text)
        body = response.json()
        assert set(body) == {"error", "reason"} and body["reason"] == "bad_top_k", body
        assert "from 1 to 3" in body["error"], body
    assert REGISTRY.get_sample_value("transferkit_rejected_inputs_total", {"reason": "bad_top_k"}) == before + 2


def test_top_k_given_twice_or_as_a_file_is_refused_and_a_bad_query_before_the_body(client, files):
    parts = [("images", (files[0][0], files[0][1], "image/png"))]
    for params, data, extra, fragment in (
            ({"top_k": "1"}, {"top_k": "1"}, [], "given 2 times"),
            ([("top_k", "1"), ("top_k", "2")], {}, [], "given 2 times"),
            ({}, {}, [("top_k", ("k.txt", b"2", "text/plain"))], "text field")):
        response = client.post("/predict", files=parts + extra, params=params, data=data)
        assert response.status_code == 400 and response.json()["reason"] == "bad_top_k", response.text
        assert fragment in response.json()["error"]
    # A bad query value is refused before the body is looked at: not the 415 a non-multipart body gets.
    response = client.post("/predict", params={"top_k": "0"}, content=b"x", headers={"Content-Type": "text/plain"})
    assert (response.status_code, response.json()["reason"]) == (400, "bad_top_k")
    assert client.post("/predict", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415


# --- metrics -----------------------------------------------------------------------------------------------------


def _samples(names: list[str]) -> dict[str, float]:
    """Each named sample summed over its label values (images are counted by model)."""
    totals = dict.fromkeys(names, 0.0)
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


HISTOGRAMS = ["transferkit_decode_seconds", "transferkit_queue_seconds", "transferkit_inference_seconds",
              "transferkit_request_images"]


def test_each_request_observes_decode_queue_inference_and_images(client, files):
    names = [f"{h}_{part}" for h in HISTOGRAMS for part in ("count", "sum")] + ["transferkit_images_predicted_total"]
    before = _samples(names)
    parts = [("images", (name, data, "image/png")) for name, data in files[:3]]
    assert client.post("/predict", files=parts).status_code == 200
    delta = {name: value - before[name] for name, value in _samples(names).items()}
    for histogram in HISTOGRAMS:  # one observation per request (one model call in this layout)
        assert delta[f"{histogram}_count"] == 1, (histogram, delta)
    assert delta["transferkit_request_images_sum"] == 3 and delta["transferkit_images_predicted_total"] == 3
    assert 0 < delta["transferkit_decode_seconds_sum"] < 5 and 0 < delta["transferkit_inference_seconds_sum"] < 5
    assert 0 <= delta["transferkit_queue_seconds_sum"] < 5
    # A refused image is not a decode duration, and a refused request is not an answered one (its wait for the
    # compute thread was real, and is counted).
    before = _samples(names)
    assert client.post("/predict", files=[("images", ("x.png", b"not an image", "image/png"))]).status_code == 400
    changed = {name for name, value in _samples(names).items() if value != before[name]}
    assert changed <= {"transferkit_queue_seconds_count", "transferkit_queue_seconds_sum"}, changed


def test_the_microbatch_layout_observes_each_request_s_queue_wait_and_each_model_call(bundle, files):
    import asyncio

    observed: list[tuple[str, float]] = []
    runtime = ModelRuntime(lambda: bundle, "onnx", "auto", 1, [1, 2, 4], max_batch=4,
                           observe=lambda stage, seconds: observed.append((stage, seconds)))
    assert runtime.settled.wait(120) and runtime.ready, runtime.error
    pixels = decode_all(files[:2], 32, 50_000_000)

    async def two_requests() -> list[np.ndarray]:
        return await asyncio.gather(runtime.predict_batched(pixels[:1]), runtime.predict_batched(pixels[1:]))

    assert [len(rows) for rows in asyncio.run(two_requests())] == [1, 1]
    stages = [stage for stage, _ in observed]
    assert stages.count("queue") == 2 and 1 <= stages.count("inference") <= 2, observed  # merged or not
    assert all(0 <= seconds < 5 for _, seconds in observed)


def test_microbatch_queue_wait_is_observed_per_request():
    from transferkit.service.microbatch import MicroBatcher

    waits: list[float] = []
    batcher = MicroBatcher(lambda pixels: pixels.sum(axis=(1, 2, 3))[:, None], 8, on_wait=waits.append)
    futures = [batcher.submit(np.ones((2, 1, 1, 1))) for _ in range(3)]
    assert [f.result(timeout=10)[0, 0] for f in futures] == [1.0, 1.0, 1.0]
    assert len(waits) == 3 and all(0 <= wait < 5 for wait in waits)


# --- the client examples ------------------------------------------------------------------------------------------


def test_the_predict_example_answers_like_the_predictor(client, files, expected):
    predict = example("predict_httpx")
    answers = predict.predict(client, files, top_k=3)
    assert len(answers) == len(files)
    for answer, probabilities in zip(answers, expected):
        assert_labels(answer, probabilities, 3)
    assert [len(answer["top_k"]) for answer in predict.predict(client, files[:1])] == [SERVER_TOP_K]
    with pytest.raises(predict.Refused) as refusal:
        predict.predict(client, files[:1], top_k=9)
    assert (refusal.value.status, refusal.value.reason) == (400, "bad_top_k")


def test_the_v2_example_answers_like_the_predictor(client, files, expected, entry):
    v2 = example("infer_v2_httpx")
    model = entry.manifest.name
    assert v2.model_metadata(client, model)["parameters"]["classes"] == CLASSES
    answer = v2.infer(client, model, [data for _, data in files])
    assert answer["model_version"] == entry.manifest.version
    np.testing.assert_allclose(np.array(v2.probabilities(answer)), expected, atol=1e-6)
    best = v2.labels(v2.infer(client, model, [data for _, data in files], classification=2))
    for row, probabilities in zip(best, expected):
        order = np.argsort(-probabilities, kind="stable")[:2]
        assert [(index, label) for _, index, label in row] == [(i, CLASSES[i]) for i in order]
        assert [score for score, _, _ in row] == pytest.approx(probabilities[order], abs=1e-5)
    with pytest.raises(httpx.HTTPStatusError, match="404 unknown_model"):
        v2.infer(client, "no-such-model", [files[0][1]])


# --- OpenAPI -----------------------------------------------------------------------------------------------------


def bentoml_document(app) -> dict:
    """The document BentoML builds for a service with ``app`` mounted at ``/``, as the entry service mounts it."""
    import bentoml

    @bentoml.service(name="operability-test")
    class Probe:
        pass

    return bentoml.asgi_app(app, path="/")(Probe).openapi_spec.asdict()


def app_operations(app) -> set[tuple[str, str]]:
    return {(route.path, method.lower()) for route in app.routes if isinstance(route, Route)
            for method in route.methods if method != "HEAD"}


def documented_operations(document: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items() for method in item
            if method in ("get", "post", "put", "delete", "patch")}


def assert_complete_and_valid(document: dict, app) -> None:
    validate_spec(document)  # raises with the first violation of OpenAPI 3.0
    routes = app_operations(app)
    assert len(routes) == 12, routes
    assert routes <= documented_operations(document), routes - documented_operations(document)
    ours = {path for path in document["paths"] if path in ("/predict", "/explain", "/metadata")
            or path.startswith("/v2")}
    assert ours == {path for path, _ in routes}  # and nothing documented that the app does not serve


def test_the_openapi_document_has_every_route_and_is_valid(app):
    document = bentoml_document(app)
    assert_complete_and_valid(document, app)
    assert document["openapi"].startswith("3.0")
    predict = document["paths"]["/predict"]["post"]
    form = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["images"] and form["properties"]["images"]["maxItems"] == MAX_IMAGES
    assert form["properties"]["images"]["items"] == {"type": "string", "format": "binary"}
    for top_k in (form["properties"]["top_k"], predict["parameters"][0]["schema"]):
        assert (top_k["type"], top_k["minimum"], top_k["maximum"]) == ("integer", 1, 3)
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/"
                                                                                     "InferRequest"}
    assert {"name": "name", "in": "path", "required": True, "description": "The model's name",
            "schema": {"type": "string", "enum": ["digits-test"]}, "example": "digits-test"} in infer["parameters"]
    assert {"InferRequest", "InferResponse", "TransferkitError", "PredictAnswer", "ExplainAnswer"} <= set(
        document["components"]["schemas"])
    explain = document["paths"]["/explain"]["post"]["responses"]["200"]["content"]
    assert set(explain) == {"image/png", "application/json"}


def schema_validator(document: dict, name: str) -> OAS30Validator:
    return OAS30Validator(document["components"]["schemas"][name])


def test_the_schemas_describe_what_the_routes_answer(client, app, files, entry):
    document = bentoml_document(app)
    assert not list(OAS30Validator({"type": "array", "items": document["components"]["schemas"]["PredictAnswer"]})
                    .iter_errors(client.post("/predict", files=[("images", files[0])]).json()))
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]
    request = infer["requestBody"]["content"]["application/json"]["example"]  # Swagger's "Try it out" body
    assert not list(schema_validator(document, "InferRequest").iter_errors(request))
    labels = client.post(f"/v2/models/{entry.manifest.name}/infer", json=request)
    assert labels.status_code == 200, labels.text
    assert labels.json()["outputs"][0]["datatype"] == "BYTES"
    probabilities = client.post(f"/v2/models/{entry.manifest.name}/infer", json={"inputs": request["inputs"]})
    assert probabilities.json()["outputs"][0]["datatype"] == "FP32"
    for answer in (labels, probabilities):
        assert not list(schema_validator(document, "InferResponse").iter_errors(answer.json()))
    metadata = client.get(f"/v2/models/{entry.manifest.name}").json()
    assert not list(schema_validator(document, "ModelMetadata").iter_errors(metadata))
    assert not list(schema_validator(document, "ServerMetadata").iter_errors(client.get("/v2").json()))
    assert not list(schema_validator(document, "Metadata").iter_errors(client.get("/metadata").json()))
    error = client.post("/predict", params={"top_k": "0"}, files=[("images", files[0])]).json()
    assert not list(schema_validator(document, "TransferkitError").iter_errors(error))
    # The validator does refuse what the schemas exclude (these checks can fail).
    assert list(schema_validator(document, "InferRequest").iter_errors({"inputs": []}))
    assert list(schema_validator(document, "TransferkitError").iter_errors({"detail": "x"}))


def test_the_hook_into_bentoml_is_in_place():
    """service/openapi.py wraps BentoML's generate_spec, read by Service.openapi_spec on each call: if BentoML moves
    either, the routes vanish from the page; this says so by name."""
    from _bentoml_sdk.service import openapi as bentoml_openapi
    from _bentoml_sdk.service.factory import Service

    openapi.install()
    assert getattr(bentoml_openapi.generate_spec, "__transferkit__", False)
    assert "from .openapi import generate_spec" in inspect.getsource(Service.openapi_spec.fget)
    assert "for app, path, _ in svc.mount_apps" in inspect.getsource(openapi.install)
    assert openapi.openapi_30({"anyOf": [{"type": "string"}, {"type": "null"}], "title": "t"}) == {
        "title": "t", "type": "string", "nullable": True}


# --- a real server: /docs.json, the Swagger page, /metrics ------------------------------------------------------


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    with ready_server(bundle, tmp_path_factory.mktemp("logs") / "operability.log", layout="inprocess",
                      max_images=MAX_IMAGES, top_k=SERVER_TOP_K) as srv:
        yield srv


def metric_samples(server, name: str) -> dict[tuple, float]:
    values: dict[tuple, float] = {}
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                values[tuple(sorted(sample.labels.items()))] = sample.value
    return values


def test_bentoml_serves_the_document_and_the_swagger_page(server, app):
    response = server.get("/docs.json")
    assert response.status_code == 200, response.text[:500]
    assert_complete_and_valid(response.json(), app)
    assert response.json()["paths"]["/predict"]["post"]["parameters"][0]["schema"]["maximum"] == 3
    page = server.get("/")
    assert page.status_code == 200 and "swagger-ui" in page.text
    initializer = server.get("/static_content/swagger-initializer.js")
    assert initializer.status_code == 200 and "./docs.json" in initializer.text


def test_metrics_on_a_real_server_and_the_examples_command_lines(server, bundle, files, capsys, tmp_path):
    manifest = read_manifest(bundle)
    info = metric_samples(server, "transferkit_model_info")
    assert info == {(("backend", "onnx"), ("layout", "inprocess"), ("model", "digits-test"),
                     ("version", manifest.version)): 1.0}, info
    names = [f"{h}_count" for h in HISTOGRAMS] + ["transferkit_request_images_sum"]
    before = {name: sum(metric_samples(server, name).values()) for name in names}
    paths = []
    for name, data in files[:2]:
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    assert example("predict_httpx").main([server.url, *map(str, paths), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith(path.name + ": ") for line, path in zip(lines, paths))
    assert all(line.count(", ") == 2 for line in lines)  # three labels each
    after = {name: sum(metric_samples(server, name).values()) for name in names}
    assert {name: after[name] - before[name] for name in names} == {
        **{f"{h}_count": 1 for h in HISTOGRAMS}, "transferkit_request_images_sum": 2}
    assert example("infer_v2_httpx").main([server.url, str(paths[0]), "--classification", "2"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(paths[0].name + ": ") and line.count(", ") == 1
