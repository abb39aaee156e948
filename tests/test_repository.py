"""One service, many models (issue 26, first part): a model repository folder or a list of references, each model
under its name; ``/predict?model=NAME``, ``/explain`` and ``/metadata`` choose per request, ``/v2/models/NAME`` per
path, a default model for requests that name none.

The routes run in-process over two real models (service/local.py) of the test bundle; one real ``bentoml serve``
of a repository folder is asked by ``tritonclient``, as a Triton user would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from serving import InProcessService, local_model, ready_server
from starlette.testclient import TestClient

from transferkit.core.errors import UsageError
from transferkit.core.images import decode_image
from transferkit.core.repository import default_model, model_sources
from transferkit.service.http import build_app
from transferkit.service.settings import ServiceSettings
from transferkit.training.rundir import split_files


def _version(bundle: Path, dest: Path, version: str) -> Path:
    """A copy of ``bundle`` whose manifest says ``version`` (the manifest is not among the checksummed files)."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["version"] = version
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@pytest.fixture(scope="module")
def repository(bundle, tmp_path_factory) -> Path:
    """``digits/`` with versions 2 and 10 (natural order: 10 is the newest), ``digits-fp16/`` one bundle, and two
    folders that hold none (ignored)."""
    repo = tmp_path_factory.mktemp("repository")
    for version in ("2", "10"):
        _version(bundle, repo / "digits" / version, version)
    _version(bundle, repo / "digits-fp16", "fp16-1")
    (repo / "notes").mkdir()
    (repo / ".staging" / "x").mkdir(parents=True)
    (repo / "README.txt").write_text("not a model")
    return repo


def test_a_repository_serves_each_folder_under_its_name_at_its_newest_version(repository):
    sources = model_sources(str(repository))
    assert [(s.name, s.path.relative_to(repository).as_posix(), s.versions) for s in sources] == [
        ("digits", "digits/10", ("2", "10")), ("digits-fp16", "digits-fp16", ())]
    assert default_model(sources, None) is None and default_model(sources, "digits-fp16") == "digits-fp16"
    with pytest.raises(UsageError, match="default model 'nope' is not served; the models are: digits, digits-fp16"):
        default_model(sources, "nope")


def test_references_combine_and_each_name_is_checked(repository, bundle, tmp_path):
    from transferkit.core.manifest import read_manifest

    one = model_sources(f"{bundle}, digits-extra:v3")
    assert [(s.name, s.path, s.tag) for s in one] == [(read_manifest(bundle).name, bundle, None),
                                                      ("digits-extra", None, "digits-extra:v3")]
    assert default_model(one[:1], None) == one[0].name  # one model: it is the default
    with pytest.raises(UsageError, match="two models are named 'digits'"):
        model_sources(f"{repository},{repository / 'digits' / '10'},digits:latest")
    bad = tmp_path / "bad-repo"
    shutil.copytree(repository / "digits-fp16", bad / "has space")
    with pytest.raises(UsageError, match="model name 'has space' must be"):
        model_sources(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="neither a transferkit bundle"):
        model_sources(str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="no such bundle directory"):
        model_sources(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def files(trained_run) -> list[tuple[str, bytes]]:
    return [(path.name, path.read_bytes()) for path, _ in split_files(trained_run.run_dir, "test")[:3]]


@pytest.fixture(scope="module")
def expected(bundle, files) -> dict[str, np.ndarray]:
    from transferkit.core.predictors import load_bundle

    pixels = np.stack([decode_image(data, 32) for _, data in files])
    loaded = load_bundle(bundle)
    return {backend: loaded.predictor(backend)(pixels) for backend in ("onnx", "onnx-fp16")}


@pytest.fixture(scope="module")
def client(bundle) -> TestClient:
    """Two models of one worker, ``a`` on onnx and ``b`` on onnx-fp16, and no default."""
    service = InProcessService(local_model(bundle, "a"), local_model(bundle, "b", backend="onnx-fp16"), default=None)
    settings = ServiceSettings(max_images=4, top_k=3)
    return TestClient(build_app(lambda: service, settings, settings.plan(cores=2, gpus=0)))


def _upload(files: list[tuple[str, bytes]]) -> list:
    return [("images", (name, data, "image/png")) for name, data in files]


def test_predict_answers_for_the_model_each_request_names(client, files, expected):
    for name, backend in (("a", "onnx"), ("b", "onnx-fp16")):
        answers = client.post(f"/predict?model={name}", files=_upload(files)).json()
        scores = [answer["score"] for answer in answers]
        np.testing.assert_allclose(scores, expected[backend].max(1), atol=1e-5)
    assert not np.allclose(expected["onnx"], expected["onnx-fp16"], atol=1e-7, rtol=0)  # the two are told apart


def test_a_request_without_a_model_or_with_an_unknown_one_is_refused_with_the_choices(client, files):
    refused = client.post("/predict", files=_upload(files[:1]))
    assert refused.status_code == 400 and refused.json()["reason"] == "model_required"
    assert "a, b" in refused.json()["error"]
    unknown = client.post("/predict?model=c%0a", files=_upload(files[:1]))
    assert unknown.status_code == 404 and unknown.json()["reason"] == "unknown_model"
    assert "'c\\n'" in unknown.json()["error"] and "a, b" in unknown.json()["error"]
    twice = client.post("/predict?model=a&model=b", files=_upload(files[:1]))
    assert twice.status_code == 400 and twice.json()["reason"] == "bad_model"
    explained = client.post("/explain?model=c", files=_upload(files[:1]))
    assert explained.status_code == 404 and explained.json()["reason"] == "unknown_model"


def test_metadata_lists_every_model_and_describes_the_one_named(client):
    listed = client.get("/metadata").json()
    assert [(m["name"], m["backend"], m["state"], m["default"]) for m in listed["models"]] == [
        ("a", "onnx", "ready", False), ("b", "onnx-fp16", "ready", False)]
    assert "backend" not in listed  # no default: the list alone
    named = client.get("/metadata?model=b").json()
    assert named["backend"] == "onnx-fp16" and named["protocols"]["predict"] == "/predict?model=b"
    assert named["name"] == "b" and named["bundle_name"] == "digits-test"
    assert [m["name"] for m in named["models"]] == ["a", "b"]


def test_v2_addresses_each_model_by_path(client, files, expected):
    from base64 import b64encode

    request = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(files)],
                           "data": [b64encode(data).decode() for _, data in files]}]}
    for name, backend in (("a", "onnx"), ("b", "onnx-fp16")):
        answer = client.post(f"/v2/models/{name}/infer", json=request).json()
        assert answer["model_name"] == name
        np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(len(files), 3), expected[backend],
                                   atol=1e-5)
        assert client.get(f"/v2/models/{name}/ready").status_code == 200
    missing = client.post("/v2/models/c/infer", json=request)
    assert missing.status_code == 404 and missing.json()["reason"] == "unknown_model"
    assert client.get("/v2/health/ready").status_code == 200


def test_images_are_counted_by_model(client, files):
    from prometheus_client import REGISTRY

    def count(model: str) -> float:
        return REGISTRY.get_sample_value("transferkit_images_predicted_total", {"model": model}) or 0.0

    before = count("a"), count("b")
    assert client.post("/predict?model=b", files=_upload(files[:2])).status_code == 200
    assert (count("a"), count("b")) == (before[0], before[1] + 2)


def test_a_real_server_of_a_repository_answers_tritonclient_for_each_model(repository, files, expected, tmp_path):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    with ready_server(repository, tmp_path / "repository.log", default_model="digits") as server:
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        assert client.is_server_ready()
        for name, version in (("digits", "10"), ("digits-fp16", "fp16-1")):
            assert client.is_model_ready(name) and client.get_model_metadata(name)["versions"] == [version]
            tensor = triton.InferInput("images", [len(files)], "BYTES")
            tensor.set_data_from_numpy(np.array([data for _, data in files], dtype=object))
            result = client.infer(name, [tensor], model_version=version)
            np.testing.assert_allclose(result.as_numpy("probabilities"), expected["onnx"], atol=1e-5)
        assert not client.is_model_ready("digits", "2")  # an older version is not served
        with pytest.raises(InferenceServerException, match="no model 'nope' is served"):
            client.get_model_metadata("nope")
        default = server.post("/predict", files=_upload(files[:1]))  # no model named: the default answers
        assert default.status_code == 200
        listed = server.get("/metadata").json()
        assert listed["name"] == "digits" and listed["version"] == "10"
        assert [(m["name"], m["default"]) for m in listed["models"]] == [("digits", True), ("digits-fp16", False)]


def test_serve_refuses_a_wrong_reference_or_default_in_one_line_before_starting(repository, tmp_path):
    from conftest import last_error_line, run_cli_here

    missing = run_cli_here("serve", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "no such bundle directory or model repository" in last_error_line(missing)
    wrong = run_cli_here("serve", str(repository), "--default-model", "nope", "--port", "1")
    assert wrong.returncode == 2 and "default model 'nope' is not served" in last_error_line(wrong)
