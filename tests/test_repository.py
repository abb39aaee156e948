"""One service, many models (issue 26, first part): a model repository folder or a list of references, each model
under its name; ``/predict?model=NAME``, ``/explain`` and ``/metadata`` choose per request, ``/v2/models/NAME`` per
path, a default model for requests that name none.

The routes run in-process over two real models (service/local.py) of the test bundle; one real ``bentoml serve``
of a repository folder is asked by ``tritonclient``, as a Triton user would.
"""

from __future__ import annotations

import json
import shutil
import time
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


def test_images_and_requests_are_counted_by_model(client, files):
    from prometheus_client import REGISTRY

    def count(model: str) -> tuple[float, ...]:
        return tuple(REGISTRY.get_sample_value(name, labels) or 0.0 for name, labels in (
            ("transferkit_images_predicted_total", {"model": model}),
            ("transferkit_model_requests_total", {"model": model, "code": "200"}),
            ("transferkit_model_requests_total", {"model": model, "code": "400"})))

    before = count("a"), count("b")
    assert client.post("/predict?model=b", files=_upload(files[:2])).status_code == 200
    broken = client.post("/predict?model=b", files=[("images", ("x.png", b"not an image", "image/png"))])
    assert broken.status_code == 400
    assert count("a") == before[0] and count("b") == (before[1][0] + 2, before[1][1] + 1, before[1][2] + 1)
    assert client.post("/predict?model=never-served", files=_upload(files[:1])).status_code == 404
    assert "never-served" not in {s.labels["model"] for f in REGISTRY.collect() for s in f.samples
                                  if s.name == "transferkit_model_requests_total"}  # only served names are labels


def test_a_real_server_of_a_repository_answers_tritonclient_for_each_model_and_its_control(repository, files,
                                                                                          expected, tmp_path):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    with ready_server(repository, tmp_path / "repository.log", default_model="digits", admin_token="s3cret") as server:
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

        # Model control, as tritonclient does it, in both workers: unload, then load again.
        admin = {"Authorization": "Bearer s3cret"}
        assert [(r["name"], r["version"], r["state"]) for r in client.get_model_repository_index(headers=admin)] == [
            ("digits", "10", "READY"), ("digits-fp16", "fp16-1", "READY")]
        client.unload_model("digits-fp16", headers=admin)
        assert not client.is_model_ready("digits-fp16") and client.is_model_ready("digits")
        with pytest.raises(InferenceServerException, match="unloaded"):
            client.infer("digits-fp16", [tensor])
        client.load_model("digits-fp16", headers=admin)
        assert client.is_model_ready("digits-fp16", "fp16-1")
        with pytest.raises(InferenceServerException, match="admin token"):
            client.load_model("digits-fp16")
        # Without the credential a name that exists and one that does not get the same 401: which folders the
        # repository holds is for the credential's holder (the guard looked them up first: 404 told them apart).
        for name in ("digits-fp16", "no-such-model"):
            refused = server.post(f"/v2/repository/models/{name}/load")
            assert refused.status_code == 401, (name, refused.text)


def test_serve_refuses_a_wrong_reference_or_default_in_one_line_before_starting(repository, tmp_path):
    from conftest import last_error_line, run_cli_here

    missing = run_cli_here("serve", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "no such bundle directory or model repository" in last_error_line(missing)
    wrong = run_cli_here("serve", str(repository), "--default-model", "nope", "--port", "1")
    assert wrong.returncode == 2 and "default model 'nope' is not served" in last_error_line(wrong)


# --- versions in and out: service/reload.py, service/control.py ---------------------------------------------------


def _infer_version(client: TestClient, files, name: str = "digits") -> tuple[int, str | None]:
    from base64 import b64encode

    request = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                           "data": [b64encode(files[0][1]).decode()]}]}
    response = client.post(f"/v2/models/{name}/infer", json=request)
    return response.status_code, response.json().get("model_version")


@pytest.fixture
def swapping(repository, bundle, tmp_path):
    """A worker serving ``digits`` from a copy of the repository, with its reloader (not started: the tests drive
    it) and the model-control routes (admin token ``s3cret``)."""
    from transferkit.core.repository import model_sources
    from transferkit.service.control import RepositoryControl
    from transferkit.service.models import ModelSet, ModelSlot
    from transferkit.service.reload import Reloader

    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    source = model_sources(str(repo))[0]

    def open_model(name, where, choice=None):
        return local_model(where, name, wait=False)

    service = InProcessService()
    service.models = ModelSet({"digits": ModelSlot("digits", local_model(source.path, "digits"), source)}, "digits")
    reloader = Reloader(service.models, open_model, worker=1, ready_timeout_s=60, retire_s=0.5,
                        control_dir=tmp_path / "control")
    control = RepositoryControl(lambda: service, b"s3cret", tmp_path / "control", 1, 60)
    settings = ServiceSettings(max_images=4)
    client = TestClient(build_app(lambda: service, settings, settings.plan(cores=2, gpus=0), control))
    return client, reloader, repo, service


def test_a_new_version_is_swapped_in_while_requests_keep_being_answered(swapping, bundle, files):
    import threading

    client, reloader, repo, _ = swapping
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            seen.append(_infer_version(client, files))

    worker = threading.Thread(target=load)
    worker.start()
    try:
        while len(seen) < 5:
            time.sleep(0.01)
        _version(bundle, repo / "digits" / "11", "11")
        reloader.poll()
        count = len(seen)
        while len(seen) < count + 5:
            time.sleep(0.01)
    finally:
        stop.set()
        worker.join()
    assert {status for status, _ in seen} == {200}
    versions = [version for _, version in seen]
    switch = versions.index("11")  # one point in time: every answer before it from 10, every one after from 11
    assert set(versions[:switch]) == {"10"} and set(versions[switch:]) == {"11"}, versions
    reloader.poll()  # nothing newer: nothing loaded
    assert _infer_version(client, files) == (200, "11")


def test_a_version_that_fails_to_load_leaves_the_old_one_serving_and_says_why(swapping, bundle, files):
    from serving import tampered_copy

    client, reloader, repo, service = swapping
    tampered_copy(bundle, repo / "digits" / "12")
    reloader.poll()
    assert _infer_version(client, files) == (200, "10")
    slot = service.models.slots["digits"]
    assert "digits/12" in slot.reason and "checksum" in slot.reason and str(repo) not in slot.reason
    listed = client.get("/metadata").json()["models"][0]
    assert listed["version"] == "10" and "checksum" in listed["reason"]
    attempts = reloader._failed.copy()
    reloader.poll()  # the same files: not tried again
    assert reloader._failed == attempts and slot.reason


def test_the_control_routes_load_and_unload_in_every_worker_with_the_admin_token(swapping, bundle, files):
    client, reloader, repo, _ = swapping
    reloader.start()  # applies the control folder's requests, as each worker of a server does
    admin = {"Authorization": "Bearer s3cret"}
    assert client.post("/v2/repository/index").status_code == 401
    assert client.post("/v2/repository/index", headers={"Authorization": "Bearer wrong"}).status_code == 401
    index = client.post("/v2/repository/index", headers=admin).json()
    assert index == [{"name": "digits", "version": "10", "state": "READY"}]
    unloaded = client.post("/v2/repository/models/digits/unload", headers=admin)
    assert unloaded.status_code == 200 and unloaded.json()["workers"] == 1
    assert client.post("/v2/repository/index", headers=admin).json()[0]["state"] == "UNAVAILABLE"
    status, _ = _infer_version(client, files)
    refused = client.post("/predict", files=_upload(files[:1]))
    assert status == 503 and refused.status_code == 503 and refused.json()["reason"] == "model_unloaded"
    _version(bundle, repo / "digits" / "13", "13")
    loaded = client.post("/v2/repository/models/digits/load", headers=admin)
    assert loaded.status_code == 200 and loaded.json()["versions"] == ["13"], loaded.text
    assert _infer_version(client, files) == (200, "13")
    missing = client.post("/v2/repository/models/nope/load", headers=admin)
    assert missing.status_code == 404 and missing.json()["reason"] == "unknown_model"
    shutil.rmtree(repo / "digits")  # its folder removed: what serves from memory can still be unloaded
    gone = client.post("/v2/repository/models/digits/unload", headers=admin)
    assert gone.status_code == 200, gone.text
    assert client.post("/predict", files=_upload(files[:1])).json()["reason"] == "model_unloaded"


def test_a_new_model_whose_load_failed_says_why_and_an_unload_clears_it(swapping, bundle, files):
    """A model added to the repository with a broken bundle: its requests say its load failed and why (not that an
    operator unloaded it); after an operator's unload, they say that."""
    from serving import tampered_copy

    client, reloader, repo, _ = swapping
    reloader.start()
    admin = {"Authorization": "Bearer s3cret"}
    tampered_copy(bundle, repo / "birds" / "1")
    loaded = client.post("/v2/repository/models/birds/load", headers=admin)
    assert loaded.status_code == 409 and loaded.json()["reason"] == "load_failed", loaded.text
    refused = client.post("/predict?model=birds", files=_upload(files[:1]))
    assert refused.status_code == 503 and refused.json()["reason"] == "model_unavailable", refused.text
    assert "its last load failed" in refused.json()["error"] and "checksum" in refused.json()["error"]
    assert "Retry-After" not in refused.headers  # an operator's fix, not time, makes it serve
    assert _infer_version(client, files, "birds")[0] == 503
    assert client.post("/v2/repository/models/birds/unload", headers=admin).status_code == 200
    assert client.post("/predict?model=birds", files=_upload(files[:1])).json()["reason"] == "model_unloaded"
    assert _infer_version(client, files) == (200, "10")  # the other model never noticed


def test_a_retried_control_request_waits_for_the_first_instead_of_loading_again(swapping, tmp_path):
    """A load that outlasts the wait answers 504 `control_timeout` and goes on; the same request again waits for it
    (each worker would otherwise load the version once more), and a new one is numbered after it whatever the
    clock says."""
    from transferkit.service.control import RepositoryControl

    _, reloader, _, service = swapping  # its reload loop not started: no worker applies the request yet
    control = RepositoryControl(lambda: service, b"s3cret", tmp_path / "control", 1, 0.5)
    settings = ServiceSettings(max_images=4)
    client = TestClient(build_app(lambda: service, settings, settings.plan(cores=2, gpus=0), control))
    admin = {"Authorization": "Bearer s3cret"}
    requests = tmp_path / "control" / "requests" / "digits.json"
    first = client.post("/v2/repository/models/digits/load", headers=admin)
    assert first.status_code == 504 and first.json()["reason"] == "control_timeout"
    serial = json.loads(requests.read_text())["serial"]
    assert client.post("/v2/repository/models/digits/load", headers=admin).status_code == 504
    assert json.loads(requests.read_text())["serial"] == serial  # the same request, not a second one
    reloader.apply_requests()  # the worker carries it out, once
    outcomes = [json.loads(path.read_text()) for path in (tmp_path / "control" / "status").glob("digits.*.json")]
    assert [(o["serial"], o["ok"]) for o in outcomes] == [(serial, True)]
    requests.write_text(json.dumps({**json.loads(requests.read_text()), "serial": serial + 10**12}))  # clock ahead
    client.post("/v2/repository/models/digits/unload", headers=admin)  # (504: no worker applies it here)
    assert json.loads(requests.read_text())["serial"] > serial + 10**12


def test_a_load_that_some_workers_failed_says_which_version_the_others_serve(swapping, tmp_path):
    """Two workers, one loads the new version and one fails: the 409 says so (it said the version serving before
    stays, which was true for one worker only)."""
    import threading

    from transferkit.service.control import RepositoryControl

    _, _, _, service = swapping
    control_dir = tmp_path / "control"
    control = RepositoryControl(lambda: service, b"s3cret", control_dir, 2, 20)
    settings = ServiceSettings(max_images=4)
    client = TestClient(build_app(lambda: service, settings, settings.plan(cores=2, gpus=0), control))

    def two_workers() -> None:  # what each worker's reload loop writes once it has carried the request out
        request = control_dir / "requests" / "digits.json"
        while not request.exists():
            time.sleep(0.02)
        serial = json.loads(request.read_text())["serial"]
        for worker, ok in ((1, True), (2, False)):
            outcome = {"serial": serial, "worker": worker, "ok": ok, "version": "10" if ok else None,
                       "reason": "" if ok else "digits/10: not ready within 60 s"}
            (control_dir / "status").mkdir(exist_ok=True)
            (control_dir / "status" / f"digits.{worker}.json").write_text(json.dumps(outcome))

    workers = threading.Thread(target=two_workers)
    workers.start()
    answer = client.post("/v2/repository/models/digits/load", headers={"Authorization": "Bearer s3cret"})
    workers.join()
    assert answer.status_code == 409 and answer.json()["reason"] == "load_failed"
    assert "1 of 2 workers serve version 10 now" in answer.json()["error"], answer.text
    assert "not ready within 60 s" in answer.json()["error"]


def test_model_control_is_off_without_an_admin_token():
    from transferkit.service.control import RepositoryControl

    service = InProcessService()
    control = RepositoryControl(lambda: service, None, None, 1, 5)
    settings = ServiceSettings()
    client = TestClient(build_app(lambda: service, settings, settings.plan(cores=2, gpus=0), control))
    for path in ("/v2/repository/index", "/v2/repository/models/x/load", "/v2/repository/models/x/unload"):
        refused = client.post(path, headers={"Authorization": "Bearer anything"})
        assert refused.status_code == 403 and refused.json()["reason"] == "control_off", path
        assert "TRANSFERKIT_ADMIN_TOKEN" in refused.json()["error"]


def test_bench_models_swaps_a_version_in_under_load_with_nothing_but_200(bundle, tmp_path):
    """``transferkit bench-models`` (swap): real ``bentoml serve``, two workers polling every second, clients
    posting all along; version 2 copied in a third of the way: every answer 200, both workers swap, and answers go
    from version 1 to version 2."""
    from conftest import run_cli

    out = tmp_path / "bench"
    result = run_cli("bench-models", str(bundle), "--out", str(out), "--scenarios", "swap", "--users", "4",
                     "--duration", "12s", "--workers", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    swap = json.loads((out / "results.json").read_text())["swap"]
    assert set(swap["statuses"]) == {"200"} and swap["requests"] > 20, swap["statuses"]
    assert sorted(w["worker"] for w in swap["workers_swapped"]) == [1, 2]
    assert swap["copied_at_s"] < swap["first_v2_answer_s"] < 12 and swap["last_v1_answer_s"] < 12
    assert (out / "swap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "| status codes |" in (
        out / "results.md").read_text()
    assert not list(out.glob("*-repository"))  # the bundle copies it made are gone
    assert "swap: status codes" in result.stdout


def test_a_memory_budget_that_holds_one_model_loads_the_other_on_demand_and_evicts_the_least_recent(bundle):
    """Two models, a budget for one: the default loads at the start, the other at its first request (503
    ``reloading`` with Retry-After meanwhile), evicting the least recently used one; requests that find their model
    loaded are answered as always."""
    from transferkit.core.repository import ModelSource
    from transferkit.service.models import ModelSet, ModelSlot
    from transferkit.service.reload import Reloader

    service = InProcessService()
    service.models = ModelSet({name: ModelSlot(name, None, ModelSource(name, path=bundle)) for name in "ab"}, "a")
    events: list[tuple[str, str]] = []
    reloader = Reloader(service.models, lambda name, where, choice=None: local_model(where, name, wait=False),
                        worker=1, ready_timeout_s=60, retire_s=0.5, budget_bytes=150,
                        estimate=lambda name, where: 100, on_event=lambda m, e, s: events.append((m, e)))
    reloader.open_initial(["a", "b"])
    slots = service.models.slots
    assert slots["a"].current is not None and slots["b"].current is None and slots["b"].evicted
    settings = ServiceSettings(max_images=4)
    client = TestClient(build_app(lambda: service, settings, settings.plan(cores=2, gpus=0)))
    assert slots["a"].current.runtime.settled.wait(60)

    def ask(name: str) -> tuple[int, str | None, str]:
        response = client.post(f"/predict?model={name}", files=[("images", ("x.png", _PNG, "image/png"))])
        answer = response.json()
        return response.status_code, response.headers.get("Retry-After"), \
            answer.get("reason", "") if isinstance(answer, dict) else ""

    assert ask("a")[0] == 200
    status, retry, reason = ask("b")
    assert (status, reason) == (503, "reloading") and int(retry) >= 1
    deadline = time.monotonic() + 60
    while ask("b")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert slots["b"].current is not None and slots["a"].current is None and slots["a"].evicted
    assert ("a", "evicted") in events and ("b", "loaded") in events
    assert ask("a")[:2][0] == 503  # now a is the one to load again
    while ask("a")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert slots["b"].current is None and slots["a"].load_seconds > 0


_PNG = __import__("base64").b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")
