"""The Open Inference Protocol (KServe v2) endpoints against a real ``bentoml serve``, with the real
``tritonclient[http]`` as the client (binary-data extension, JSON, classification extension) and the same 4xx
contract as ``/predict`` for bad input."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from hostile_images import png_bomb
from PIL import Image
from serving import ready_server
from tritonclient.utils import InferenceServerException

from transferkit.core.images import decode_image
from transferkit.training.rundir import split_files

MAX_IMAGES = 4
CLASSES = ["0", "1", "7"]


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    with ready_server(bundle, tmp_path_factory.mktemp("logs") / "oip.log", max_images=MAX_IMAGES,
                      max_body_mb=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def files(trained_run) -> list[bytes]:
    return [path.read_bytes() for path, _ in split_files(trained_run.run_dir, "test")[:MAX_IMAGES]]


@pytest.fixture(scope="module")
def expected(bundle, files) -> np.ndarray:
    from transferkit.core.predictors import load_bundle

    return load_bundle(bundle).predictor("onnx")(np.stack([decode_image(f, 32) for f in files]))


def images_input(files: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(files)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(files, dtype=object))
    else:  # JSON cannot hold raw bytes: each element is the file's base64 text
        tensor.set_data_from_numpy(np.array([base64.b64encode(f) for f in files], dtype=object), binary_data=False)
    return tensor


def triton_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_health_and_metadata(client, server, bundle):
    from transferkit.core.manifest import read_manifest

    manifest = read_manifest(bundle)
    # /readyz answered 200 (from one worker): every worker is ready then (service/balance.py's WorkerReadiness).
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits-test") and client.is_model_ready("digits-test", manifest.version)
    assert not client.is_model_ready("no-such-model")
    assert set(client.get_server_metadata()["extensions"]) >= {"binary_tensor_data", "classification"}
    meta = client.get_model_metadata("digits-test")
    assert meta["versions"] == [manifest.version]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "images": ("BYTES", [-1]), "pixels": ("UINT8", [-1, 32, 32, 3])}
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "cam", "datatype": "FP32", "shape": [-1, 1, 1]}]
    error = triton_error(lambda: client.get_model_metadata("no-such-model"))
    assert error.status() == "404" and "digits-test" in error.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoded_images_as_bytes_tensor(client, files, expected, binary):
    output = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer("digits-test", [images_input(files, binary)], outputs=[output])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(files), 3)
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)


def test_pixels_as_uint8_tensor_binary_and_json(client, files, expected):
    pixels = np.stack([decode_image(f, 32) for f in files])
    for binary in (True, False):
        tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        result = client.infer("digits-test", [tensor])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)


def test_the_cam_output_comes_when_requested_by_name(client, files, bundle):
    """tritonclient asks for the class activation map beside the probabilities (binary and JSON)."""
    from transferkit.core.predictors import load_bundle

    probabilities, maps = load_bundle(bundle).predictor("onnx").explain(
        np.stack([decode_image(f, 32) for f in files]))
    outputs = [triton.InferRequestedOutput("cam", binary_data=True),
               triton.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer("digits-test", [images_input(files)], outputs=outputs)
    np.testing.assert_allclose(result.as_numpy("cam"), maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, atol=1e-6)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["cam", "probabilities"]


def test_classification_extension_returns_top_k_labels(client, files, expected):
    output = triton.InferRequestedOutput("probabilities", class_count=2)
    labels = client.infer("digits-test", [images_input(files)], outputs=[output]).as_numpy("probabilities")
    assert labels.shape == (len(files), 2)
    for row, probabilities in zip(labels, expected):
        order = np.argsort(-probabilities)[:2]
        parsed = [item.decode().split(":") for item in row]
        assert [int(index) for _, index, _ in parsed] == list(order)
        assert [label for _, _, label in parsed] == [CLASSES[i] for i in order]
        assert [float(score) for score, _, _ in parsed] == pytest.approx(probabilities[order], abs=1e-5)


def test_same_answer_as_predict(server, client, files):
    predicted = server.post("/predict", files=[("images", ("a.png", files[0], "image/png"))]).json()[0]
    probabilities = client.infer("digits-test", [images_input(files[:1])]).as_numpy("probabilities")[0]
    assert predicted["label"] == CLASSES[int(probabilities.argmax())]
    assert predicted["score"] == pytest.approx(float(probabilities.max()), abs=1e-6)


def test_bad_input_gets_the_same_4xx_contract_as_predict(client, server, files):
    cases = [
        ([images_input([b"not an image at all" * 5])], "400", "not a supported image"),
        ([images_input([png_bomb(30000, 30000)])], "413", "image too large"),
        ([images_input(files[:1] * (MAX_IMAGES + 1))], "413", f"at most {MAX_IMAGES} images"),
        ([images_input([files[0][: len(files[0]) // 2]])], "400", "images[0]"),
    ]
    wrong_shape = triton.InferInput("pixels", [1, 31, 32, 3], "UINT8")
    wrong_shape.set_data_from_numpy(np.zeros((1, 31, 32, 3), np.uint8))
    cases.append(([wrong_shape], "400", "expected UINT8 [N,32,32,3]"))
    floats = triton.InferInput("pixels", [1, 32, 32, 3], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.float32))
    cases.append(([floats], "400", "'images' (BYTES [N]) or 'pixels' (UINT8"))
    for inputs, status, fragment in cases:
        error = triton_error(lambda inputs=inputs: client.infer("digits-test", inputs))
        assert error.status() == status and fragment in error.message(), (status, fragment, error)
    # Hand-made requests for what tritonclient would never send.
    url = server.url + "/v2/models/digits-test/infer"
    pixels = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 3072}]}
    mismatched = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": 99}}]}).encode()
    for body, headers, fragment in [
        (b"{not json", {}, "not valid JSON"),
        (json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                                 "data": [300] * 3072}]}).encode(), {}, "integers 0-255"),
        (b"{}", {"Inference-Header-Content-Length": "100000"}, "does not fit"),
        (mismatched + b"abc", {"Inference-Header-Content-Length": str(len(mismatched))}, "does not match"),
        (json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                 "data": ["@@not base64@@"]}]}).encode(), {}, "base64"),
        # What reached a 500, a reset or a wrong 200 before (issue 25); tests/test_hostile_http.py has the rest.
        (b'{"id": Infinity, "inputs": []}', {}, "Infinity"),
        (b'{"id": "\\ud800", "inputs": []}', {}, "surrogate"),
        (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, "more than 32 deep"),
        (json.dumps({**pixels, "parameters": {"binary_data_output": "false"}}).encode(), {}, "true or false"),
        (json.dumps({**pixels, "parameters": [1]}).encode(), {}, "must be a JSON object"),
    ]:
        response = requests.post(url, data=body, headers=headers, timeout=30)
        assert response.status_code == 400, response.text
        assert fragment in response.json()["error"] and response.json()["reason"]
    response = requests.post(url, data=bytes(3 * 1024 * 1024), timeout=30)
    assert response.status_code == 413 and response.json()["reason"] == "body_too_large"
    assert requests.get(url, timeout=10).status_code == 405
    assert client.is_server_ready()  # still serving after all of it


def test_binary_response_layout_by_hand(server, files):
    """The binary-data extension as the spec writes it: JSON header, then the raw little-endian FP32 tensor."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(files[0])).save(buffer, "PNG")
    data = buffer.getvalue()
    element = len(data).to_bytes(4, "little") + data
    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(element)}}],
                         "parameters": {"binary_data_output": True}, "id": "r1"}).encode()
    response = requests.post(server.url + "/v2/models/digits-test/infer", data=header + element,
                             headers={"Inference-Header-Content-Length": str(len(header))}, timeout=30)
    assert response.status_code == 200, response.text
    size = int(response.headers["Inference-Header-Content-Length"])
    head = json.loads(response.content[:size])
    assert head["id"] == "r1" and head["outputs"][0]["parameters"]["binary_data_size"] == 12
    probabilities = np.frombuffer(response.content[size:], "<f4")
    assert probabilities.shape == (3,) and probabilities.sum() == pytest.approx(1.0, abs=1e-5)
