"""Layouts by device: the settings model that chooses them, and the GPU layout (``batched``: entry workers feeding a
batched model service) run for real on CPU, so that it keeps working where no GPU is present."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from faulty_bundle import write_faulty_bundle
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serving import ROOT, Server, ready_server, tampered_copy

from transferkit.core.errors import UsageError
from transferkit.core.images import decode_image
from transferkit.service.settings import ServiceSettings, settings_table
from transferkit.training.rundir import split_files

# --- the settings model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cores,gpus,overrides,scaling,expected,why", [
    (2, 0, {}, None, ("inprocess", 2, 2, 1), "not measured"),  # CPU: one session per core, no model process
    (64, 0, {}, 1.05, ("inprocess", 16, 16, 4), "1.05x"),  # capped copies of the model, the cores shared
    (3, 0, {"workers": 1}, None, ("inprocess", 1, 1, 3), "no throughput"),
    (2, 0, {}, 3.04, ("microbatch", 2, 2, 1), "3.04x"),  # batching pays: the same sessions, batched per worker
    (2, 0, {}, 1.29, ("inprocess", 2, 2, 1), "1.29x"),  # just below the rule: no batching
    (32, 2, {}, 3.0, ("batched", 16, 2, 1), "2 GPU(s)"),  # GPUs: entry scaled to the cores, a model process per GPU
    (8, 1, {"device": "cpu"}, None, ("inprocess", 8, 8, 1), "CPU"),  # --device cpu ignores the GPU
    (8, 1, {"layout": "inprocess"}, 3.0, ("inprocess", 8, 8, 1), "TRANSFERKIT_LAYOUT"),
    (2, 0, {"layout": "batched"}, None, ("batched", 2, 1, 2), "TRANSFERKIT_LAYOUT"),  # forced on CPU (tests below)
    (2, 0, {"layout": "microbatch", "workers": 1}, None, ("microbatch", 1, 1, 2), "TRANSFERKIT_LAYOUT"),
    (8, 1, {"backend": "savedmodel"}, 3.0, ("inprocess", 1, 1, 8), "TensorFlow"),  # TF sizes its own pools
])
def test_plan_follows_the_hardware_and_the_measured_batch_scaling(cores, gpus, overrides, scaling, expected, why):
    plan = ServiceSettings(**overrides).plan(cores=cores, gpus=gpus, batch_scaling=scaling)
    assert (plan.layout, plan.entry_workers, plan.model_workers, plan.threads) == expected
    assert why in plan.reason


def test_settings_come_from_the_environment_and_name_the_bad_variable(monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_MAX_IMAGES", "7")
    monkeypatch.setenv("TRANSFERKIT_LAYOUT", "batched")
    settings = ServiceSettings.from_env()
    assert settings.max_images == 7 and settings.layout == "batched"
    monkeypatch.setenv("TRANSFERKIT_MAX_BATCH_SIZE", "1")
    with pytest.raises(UsageError, match="TRANSFERKIT_MAX_BATCH_SIZE"):
        ServiceSettings.from_env()
    monkeypatch.setenv("TRANSFERKIT_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("TRANSFERKIT_LAYOUT", "fastest")
    with pytest.raises(UsageError, match="TRANSFERKIT_LAYOUT"):
        ServiceSettings.from_env()


def test_readme_settings_table_is_the_settings_model():
    """One source of defaults: the README's table is exactly what the model renders."""
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `TRANSFERKIT_")]
    assert "\n".join(rows) == "\n".join(line for line in settings_table().splitlines()
                                        if line.startswith("| `TRANSFERKIT_"))
    assert len(rows) == len(ServiceSettings.model_fields)


def test_the_settings_model_owns_the_drain_timeout_every_process_uses(monkeypatch):
    """The launcher sizes its stop by the server's drain timeout and a worker drains for it: both read the setting
    through the settings model, so the variable's name, its default and its validation are the model's."""
    from transferkit.service import settings
    from transferkit.service.launcher import BentoServer

    assert settings.DEFAULT_DRAIN_TIMEOUT_S == ServiceSettings().drain_timeout_s == 30
    assert settings.SERVER_STOP_GRACE_S > settings.WORKER_EXIT_GRACE_S  # the launcher outwaits a worker's forced exit
    assert BentoServer(None, drain_timeout_s=7).stop_timeout_s == 7 + settings.SERVER_STOP_GRACE_S
    for invalid in ("0", "2.5", "soon"):  # the service refuses these; the launcher waits the default
        monkeypatch.setenv(settings.DRAIN_TIMEOUT_ENV, invalid)
        assert BentoServer(None).drain_timeout_s == settings.DEFAULT_DRAIN_TIMEOUT_S
    monkeypatch.setenv("TRANSFERKIT_DRAIN_TIMEOUT_S", "12")
    assert settings.setting_from(os.environ, "drain_timeout_s") == ServiceSettings.from_env().drain_timeout_s == 12


def test_public_settings_hide_the_model_location():
    public = ServiceSettings(model="/srv/secret/bundle").public()
    assert "model" not in public and "/srv/secret" not in repr(public)


# --- the batched layout on CPU ------------------------------------------------------------------------------------


def batch_counters(server, service_name: str) -> tuple[float, float]:
    """(images, model calls) through one model service's adaptive batcher so far."""
    total = count = 0.0
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            if sample.labels.get("runner_name") != service_name:  # service_name is the bento's name in a bento
                continue
            if sample.name == "bentoml_service_adaptive_batch_size_sum":
                total += sample.value
            elif sample.name == "bentoml_service_adaptive_batch_size_count":
                count += sample.value
    return total, count


ADMIN = "batched-admin-token"


@pytest.fixture(scope="module")
def batched(bundle, tmp_path_factory):
    """The batched layout serving a model repository of two models: the trained bundle as ``digits-test`` (the
    default) and a copy of it as ``other``, polled for new versions, model control on, one spare model service."""
    import shutil

    repository = tmp_path_factory.mktemp("repository")
    shutil.copytree(bundle, repository / "digits-test")  # a bundle as the model's folder: never polled
    shutil.copytree(bundle, repository / "other" / "1")  # version folders: polled for newer ones
    with ready_server(repository, tmp_path_factory.mktemp("logs") / "batched.log", layout="batched",
                      max_batch_size=16, max_latency_ms=10_000, default_model="digits-test", poll_s=0.5,
                      admin_token=ADMIN, spare_models=1) as srv:
        srv.repository = repository
        yield srv


def _post_concurrently(server, files: list[Path], query: str = "") -> list:
    with ThreadPoolExecutor(24) as pool:
        return list(pool.map(lambda p: server.post(f"/predict{query}", files=[("images", (p.name, p.read_bytes(),
                                                                                            "image/png"))]), files))


def test_batched_layout_runs_a_model_service_and_batches_concurrent_requests(batched, bundle, trained_run):
    from transferkit.core.predictors import load_bundle

    meta = batched.get("/metadata").json()
    assert meta["layout"]["name"] == "batched" and meta["batching"]["max_batch_size"] == 16
    assert len(batched.workers("transferkit-model-digits-test")) == meta["layout"]["model_workers"] == 1
    assert len(batched.workers("transferkit")) == meta["layout"]["entry_workers"]
    predictor = load_bundle(bundle).predictor("onnx")
    assert meta["runtime"]["provider"] == predictor.provider
    files = [path for path, _ in split_files(trained_run.run_dir, "test")[:48]]
    before = batch_counters(batched, "transferkit-model-digits-test")
    responses = _post_concurrently(batched, files)
    after = batch_counters(batched, "transferkit-model-digits-test")
    for path, response in zip(files, responses):
        assert response.status_code == 200, response.text
        expected = predictor(decode_image(path.read_bytes(), 32)[None])[0]
        assert response.json()[0]["score"] == pytest.approx(float(expected.max()), abs=1e-5)
    calls = after[1] - before[1]
    assert calls > 0 and (after[0] - before[0]) == len(files)  # every image went through the batcher once
    assert (after[0] - before[0]) / calls > 1.0  # some model calls carried images from several requests


def test_batched_layout_serves_each_model_from_its_own_model_service(batched, trained_run):
    """Two models at once: each request's images reach its own model's batcher only (a batch never mixes models,
    each model's batching statistics are its own), and /metadata lists both."""
    meta = batched.get("/metadata").json()
    assert [(m["name"], m["default"]) for m in meta["models"]] == [("digits-test", True), ("other", False)]
    assert len(batched.workers("transferkit-model-other")) == meta["layout"]["model_workers"]
    files = [path for path, _ in split_files(trained_run.run_dir, "test")[:30]]
    services = ("transferkit-model-digits-test", "transferkit-model-other")
    before = [batch_counters(batched, name) for name in services]
    with ThreadPoolExecutor(2) as pool:
        mine, others = pool.map(lambda query_files: _post_concurrently(batched, *query_files),
                                [(files[:9], ""), (files[:21], "?model=other")])
    after = [batch_counters(batched, name) for name in services]
    assert all(r.status_code == 200 for r in mine + others), [r.text for r in mine + others if r.status_code != 200]
    assert [a[0] - b[0] for a, b in zip(after, before)] == [9, 21]
    assert [r.json()[0]["score"] for r in mine] == pytest.approx([r.json()[0]["score"] for r in others[:9]],
                                                                 abs=1e-5)  # the same weights under two names
    pixels = decode_image(files[0].read_bytes(), 32)[None]
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    client = triton.InferenceServerClient(batched.url.removeprefix("http://"))
    assert float(client.infer("other", [tensor]).as_numpy("probabilities").max()) == pytest.approx(
        others[0].json()[0]["score"], abs=1e-6)
    unknown = batched.post("/predict?model=nope", files=[("images", (files[0].name, files[0].read_bytes(),
                                                                     "image/png"))])
    assert unknown.status_code == 404 and unknown.json()["reason"] == "unknown_model"


def _new_version(bundle: Path, model_folder: Path, version: str, **changes) -> None:
    """Copy ``bundle`` in as version ``version`` the way an operator should: under a dot name, renamed once whole."""
    import json
    import shutil

    staging = model_folder / f".{version}"
    shutil.copytree(bundle, staging)
    manifest = json.loads((staging / "manifest.json").read_text())  # not among the checksummed files
    (staging / "manifest.json").write_text(json.dumps({**manifest, "version": version, **changes}))
    staging.rename(model_folder / version)


def test_batched_layout_swaps_in_a_polled_version_and_refuses_one_with_other_classes(batched, bundle, trained_run):
    """The model process polls its repository folder: a new version is loaded beside the old and swapped in while
    requests keep coming (every one answered 200), and the entry follows (/metadata, the protocol's model_version);
    a version whose classes differ is refused there, the old one still serving, with the reason."""
    import base64

    from transferkit.core.manifest import read_manifest

    path = split_files(trained_run.run_dir, "test")[0][0]
    upload = [("images", (path.name, path.read_bytes(), "image/png"))]
    first = read_manifest(bundle).version
    assert [m["version"] for m in batched.get("/metadata").json()["models"]] == [first, first]
    _new_version(bundle, batched.repository / "other", "2")
    statuses, deadline = [], time.monotonic() + 90
    while time.monotonic() < deadline:
        statuses += [r.status_code for r in _post_concurrently(batched, [path] * 4, "?model=other")]
        if batched.get("/metadata?model=other").json()["version"] == "2":
            break
    assert statuses and set(statuses) == {200}, statuses
    assert batched.get("/metadata?model=other").json()["version"] == "2", batched.log()[-3000:]
    assert batched.get("/metadata").json()["version"] == first  # the other model is untouched
    request = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                           "data": [base64.b64encode(path.read_bytes()).decode()]}]}
    # Each entry worker follows the swap within FOLLOW_S (2 s) of a request: the answer may name version 1 until then.
    versions, deadline = [], time.monotonic() + 20
    while not versions or versions[-1] != "2" and time.monotonic() < deadline:
        versions.append(batched.post("/v2/models/other/infer", json=request).json()["model_version"])
        time.sleep(0.2)
    assert versions[-1] == "2", versions

    names = list(reversed(read_manifest(bundle).class_names))
    _new_version(bundle, batched.repository / "other", "3", class_names=names)
    deadline = time.monotonic() + 60
    while "its classes differ" not in batched.log() and time.monotonic() < deadline:
        time.sleep(0.3)
    listed = {m["name"]: m for m in batched.get("/metadata").json()["models"]}["other"]
    assert listed["version"] == "2" and "its classes differ" in listed["reason"], listed
    assert batched.post("/predict?model=other", files=upload).status_code == 200


def test_batched_layout_unloads_and_loads_a_model_in_its_own_processes(batched, trained_run):
    """Model control reaches the model's own service: unloaded, it answers 503 model_unloaded (the other model and
    readiness unaffected); a load of a version with other classes is refused with the reason (409); a load of a
    compatible one serves again."""
    import shutil

    path = split_files(trained_run.run_dir, "test")[0][0]
    upload = [("images", (path.name, path.read_bytes(), "image/png"))]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    anonymous = batched.post("/v2/repository/models/other/unload")
    assert anonymous.status_code == 401, anonymous.text
    unloaded = batched.post("/v2/repository/models/other/unload", headers=admin)
    assert unloaded.status_code == 200 and unloaded.json()["workers"] == 1, unloaded.text
    refused = batched.post("/predict?model=other", files=upload)
    assert refused.status_code == 503 and refused.json()["reason"] == "model_unloaded", refused.text
    assert batched.post("/predict", files=upload).status_code == 200 and batched.get("/readyz").status_code == 200
    index = {row["name"]: row for row in batched.post("/v2/repository/index", headers=admin).json()}
    assert index["other"]["state"] == "UNAVAILABLE" and index["digits-test"]["state"] == "READY", index
    # The newest version folder (3, left by the test above) has other classes: refused, still unloaded.
    failed = batched.post("/v2/repository/models/other/load", headers=admin)
    assert failed.status_code == 409 and "its classes differ" in failed.json()["error"], failed.text
    assert batched.post("/predict?model=other", files=upload).status_code == 503
    shutil.rmtree(batched.repository / "other" / "3")  # this module's own copy
    loaded = batched.post("/v2/repository/models/other/load", headers=admin)
    assert loaded.status_code == 200 and loaded.json()["versions"] == ["2"], loaded.text
    assert batched.post("/predict?model=other", files=upload).status_code == 200


def test_batched_layout_loads_a_model_it_did_not_start_with_into_a_spare_model_service(batched, trained_run):
    """A repository folder added after the start is loaded by name into the spare model service (one here), then
    served by every entry worker, listed, unloaded and loaded again; a second new name finds no spare left: 409."""
    import shutil

    from transferkit.core.manifest import read_manifest

    path = split_files(trained_run.run_dir, "test")[0][0]
    upload = [("images", (path.name, path.read_bytes(), "image/png"))]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    shutil.copytree(batched.repository / "digits-test", batched.repository / "late")
    assert batched.post("/predict?model=late", files=upload).status_code == 404  # not served until loaded
    late = batched.post("/v2/repository/models/late/load", headers=admin)
    version = read_manifest(batched.repository / "late").version
    assert late.status_code == 200 and late.json()["versions"] == [version], late.text
    expected = batched.post("/predict", files=upload).json()
    for _ in range(4):  # each entry worker, whichever takes the connection, finds the model
        answer = batched.post("/predict?model=late", files=upload)
        assert answer.status_code == 200, answer.text
        assert answer.json()[0]["label"] == expected[0]["label"]  # the same weights under another name
        assert answer.json()[0]["score"] == pytest.approx(expected[0]["score"], abs=1e-5)
    assert "late" in {model["name"] for model in batched.get("/metadata").json()["models"]}
    assert len(batched.workers("transferkit-model-spare-0")) == 1
    pixels = decode_image(path.read_bytes(), 32)[None]
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    client = triton.InferenceServerClient(batched.url.removeprefix("http://"))
    assert client.is_model_ready("late")
    probabilities = client.infer("late", [tensor]).as_numpy("probabilities")
    assert float(probabilities.max()) == pytest.approx(expected[0]["score"], abs=1e-5)
    shutil.copytree(batched.repository / "digits-test", batched.repository / "later")
    refused = batched.post("/v2/repository/models/later/load", headers=admin)
    assert refused.status_code == 409 and "every spare model service is taken (1: late)" in refused.json()["error"]
    assert batched.post("/v2/repository/models/late/unload", headers=admin).status_code == 200
    unloaded = batched.post("/predict?model=late", files=upload)
    assert unloaded.status_code == 503 and unloaded.json()["reason"] == "model_unloaded", unloaded.text
    assert batched.post("/v2/repository/models/late/load", headers=admin).status_code == 200
    assert batched.post("/predict?model=late", files=upload).status_code == 200


def test_batched_layout_keeps_two_models_within_a_budget_that_holds_one(bundle, trained_run, tmp_path):
    """A memory budget in the batched layout (service/ledger.py): each model has a process of its own, and the two
    share one device's budget. The default loads at the start; a request for the other is answered 503 `reloading`
    with Retry-After while its process asks the default's to let go, then loads; then the default is the one to load
    again. Every answer is 200 or that 503, nothing else."""
    import shutil

    from transferkit.core.manifest import read_manifest
    from transferkit.service.models import estimated_bytes

    repository = tmp_path / "repository"
    for name in "ab":
        shutil.copytree(bundle, repository / name / "1")
    one_mb = estimated_bytes(read_manifest(bundle), "onnx") / 2**20
    path = split_files(trained_run.run_dir, "test")[0][0]
    upload = [("images", (path.name, path.read_bytes(), "image/png"))]
    with ready_server(repository, tmp_path / "budget.log", layout="batched", default_model="a",
                      memory_budget_mb=int(one_mb * 1.5)) as srv:
        refusals: list[tuple[str, int]] = []

        def until_answered(name: str) -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                response = srv.post(f"/predict?model={name}", files=upload)
                if response.status_code == 200:
                    return
                assert response.status_code == 503 and response.json()["reason"] == "reloading", response.text
                refusals.append((name, int(response.headers["Retry-After"])))
                time.sleep(0.2)
            raise AssertionError(f"model {name} never answered:\n{srv.log()[-3000:]}")

        assert srv.post("/predict?model=a", files=upload).status_code == 200  # loaded at the start
        # b waits for its first request, let go on purpose: the server is ready (as in-process, which skips it).
        assert srv.get("/v2/health/ready").status_code == 200
        until_answered("b")
        until_answered("a")
        log = srv.log()
    assert [name for name, _ in refusals[:1]] == ["b"] and "a" in {name for name, _ in refusals}, refusals
    assert all(retry >= 1 for _, retry in refusals)
    assert log.count("unloaded to make room for another model's process") == 2, log[-3000:]
    assert "Traceback" not in log  # a model process's refusals are logged as what happened, not as tracebacks


def test_batched_layout_speaks_the_open_inference_protocol(batched, trained_run):
    client = triton.InferenceServerClient(batched.url.removeprefix("http://"))
    path = split_files(trained_run.run_dir, "test")[0][0]
    pixels = decode_image(path.read_bytes(), 32)[None]
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    probabilities = client.infer("digits-test", [tensor]).as_numpy("probabilities")
    answer = batched.post("/predict", files=[("images", ("a.png", path.read_bytes(), "image/png"))]).json()[0]
    assert answer["score"] == pytest.approx(float(probabilities.max()), abs=1e-6)


def test_batched_layout_explains_through_the_model_service(batched, bundle, trained_run):
    """The map comes from the model process (its explain API), for /v2's cam output and for /explain."""
    from transferkit.core.predictors import load_bundle

    path = split_files(trained_run.run_dir, "test")[0][0]
    pixels = decode_image(path.read_bytes(), 32)[None]
    expected, maps = load_bundle(bundle).predictor("onnx").explain(pixels)
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    client = triton.InferenceServerClient(batched.url.removeprefix("http://"))
    result = client.infer("digits-test", [tensor], outputs=[triton.InferRequestedOutput("cam")])
    np.testing.assert_allclose(result.as_numpy("cam"), maps, rtol=1e-5, atol=1e-6)
    answer = batched.post("/explain?format=json", files=[("images", ("a.png", path.read_bytes(), "image/png"))])
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()[0]["cam"]["values"], maps[0], rtol=1e-5, atol=1e-5)
    assert answer.json()[0]["score"] == pytest.approx(float(expected.max()), abs=1e-6)
    png = batched.post("/explain", files=[("images", ("a.png", path.read_bytes(), "image/png"))])
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_batched_layout_with_a_failed_model_says_model_unavailable(bundle, tmp_path):
    copy = tampered_copy(bundle, tmp_path / "tampered", position=0.5)
    srv = Server(copy, tmp_path / "tampered.log", layout="batched", timeout_s=10)
    try:
        srv.wait_listening()
        deadline = time.monotonic() + 30
        while "refusing to serve" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert srv.get("/readyz").status_code == 503 and srv.get("/livez").status_code == 200
        png = _png(30)
        response = srv.post("/predict", files=[("images", ("x.png", png, "image/png"))])
        assert response.status_code == 503 and response.json()["reason"] == "model_unavailable", response.text
        assert "checksum" in response.json()["error"]
    finally:
        srv.stop()


def _png(value: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (value, value, value)).save(buffer, "PNG")
    return buffer.getvalue()


def test_batched_layout_drains_the_entry_before_the_model_stops(tmp_path: Path):
    """SIGTERM with slow requests in flight: the model service outlives them (BentoML would stop it at once)."""
    bundle_dir = write_faulty_bundle(tmp_path / "bundle")
    # The batcher's latency budget out of the way: with the other test worker on both cores the slow model took
    # seconds a call, and BentoML's dispatcher refused the fourth request (503) for its 10-s default, not the drain.
    srv = Server(bundle_dir, tmp_path / "drain.log", layout="batched", timeout_s=30, max_batch_size=2,
                 max_latency_ms=60_000)
    try:
        srv.wait_ready()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(srv.post, "/predict", files=[("images", ("w.png", _png(250), "image/png"))])
                       for _ in range(4)]
            time.sleep(0.5)  # the first batch is in the model, the rest wait in the entry and the batcher
            srv.terminate()
            statuses = [f.result().status_code for f in futures]
        assert statuses == [200, 200, 200, 200], statuses
        assert srv.wait(90) == 0
        assert not re.search(r"model call failed|UnixClientConnectorError", srv.log())
    finally:
        srv.stop()


# --- honest failure codes, without a server ------------------------------------------------------------------------


def test_a_warming_worker_answers_a_retryable_503_and_a_failed_one_model_unavailable(bundle):
    import asyncio
    import threading

    from transferkit.core.errors import BundleError, ModelUnavailable
    from transferkit.service.http import error_for
    from transferkit.service.runtime import ModelRuntime

    release = threading.Event()

    def slow_bundle():  # loading is stuck (a large bundle being verified, a slow disk)
        release.wait(30)
        return bundle

    warming = ModelRuntime(slow_bundle, "onnx", "cpu", 1, [1])
    with pytest.raises(ModelUnavailable) as info:
        asyncio.run(warming.wait_ready(0.1))
    assert info.value.reason == "warming_up" and info.value.retry_after
    response = error_for(info.value)
    assert response.status_code == 503 and response.headers["Retry-After"] == str(info.value.retry_after)
    release.set()
    asyncio.run(warming.wait_ready(60))  # loads, warms, then serves
    assert warming.ready and warming.predict(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 3)

    def missing():
        raise BundleError("/srv/models/x is not a transferkit bundle: manifest.json is missing")

    failed = ModelRuntime(missing, "onnx", "cpu", 1, [1])
    with pytest.raises(ModelUnavailable) as info:
        asyncio.run(failed.wait_ready(10))
    assert info.value.reason == "model_unavailable" and info.value.retry_after is None
    assert "manifest.json is missing" in info.value.message and "/srv/models" not in info.value.message
    assert error_for(info.value).status_code == 503 and "Retry-After" not in error_for(info.value).headers


def test_a_version_let_go_closes_once_its_calls_are_done_and_refuses_new_ones(tmp_path):
    """What the memory budget frees: an evicted version's session goes once its calls are done (it stayed a
    request timeout, 30 s, while the budget counted it freed: ten reloads in 30 s held ten sessions), and a request
    that took it before the eviction but calls after is answered 503 `reloading`."""
    from transferkit.core.errors import ModelUnavailable
    from transferkit.service.runtime import ModelRuntime

    bundle = write_faulty_bundle(tmp_path / "bundle")
    runtime = ModelRuntime(lambda: bundle, "onnx", "cpu", 1, [1])
    assert runtime.settled.wait(60) and runtime.ready, runtime.error
    pixels = np.full((1, 32, 32, 3), 30, np.uint8)
    with runtime.in_use():  # a call still running
        runtime.retire(0.0, within_s=30)
        time.sleep(0.5)
        assert not runtime.retired and runtime.predict(pixels).shape == (1, 2)
    deadline = time.monotonic() + 5
    while runtime.predictor is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert runtime.retired and runtime.predictor is None  # let go within moments of its last call
    with pytest.raises(ModelUnavailable) as refused:
        runtime.predict(pixels)
    assert (refused.value.reason, refused.value.retry_after) == ("reloading", 1)


def test_a_request_whose_wait_used_up_the_latency_budget_is_refused_before_any_work(tmp_path):
    """Admission predicts the wait from the measured rate; when the real wait for a compute thread leaves no time for
    the model (a burst before the rate was measured), the request gets 503 `overloaded` instead of a late answer,
    and the model never runs it. Without a budget it waits and is answered."""
    import asyncio
    import threading

    from transferkit.core.errors import ModelUnavailable
    from transferkit.service.middleware import ADMITTED_AT
    from transferkit.service.runtime import ModelRuntime

    bundle = write_faulty_bundle(tmp_path / "bundle")
    pixels = np.full((1, 32, 32, 3), 30, np.uint8)

    async def behind_a_slow_call(runtime: ModelRuntime) -> tuple[list, list]:
        ran: list = []

        def work(tag: str):
            ran.append(tag)
            time.sleep(0.6 if tag == "slow" else 0.0)
            return runtime.predict(pixels)

        answers = await asyncio.gather(runtime.run(work, "slow"), runtime.run(work, "queued"),
                                       return_exceptions=True)
        return answers, ran

    budgeted = ModelRuntime(lambda: bundle, "onnx", "cpu", 1, [1], start_within_s=0.4)
    assert budgeted.settled.wait(60) and budgeted.ready, budgeted.error
    answers, ran = asyncio.run(behind_a_slow_call(budgeted))
    assert answers[0].shape == (1, 2) and ran == ["slow"]
    assert isinstance(answers[1], ModelUnavailable) and answers[1].reason == "overloaded" and answers[1].retry_after
    assert "latency budget" in answers[1].message

    async def after_a_long_upload(behind_others: bool, runtime: ModelRuntime = budgeted) -> np.ndarray:
        ADMITTED_AT.set((time.perf_counter() - 1.0, behind_others))  # admitted 1 s ago, its body arriving since
        return await runtime.run(runtime.predict, pixels)

    with pytest.raises(ModelUnavailable, match="latency budget"):  # queued behind others' uploads and calls
        asyncio.run(after_a_long_upload(True))
    assert asyncio.run(after_a_long_upload(False)).shape == (1, 2)  # alone: a slow link, refusing frees nothing
    slower = ModelRuntime(lambda: bundle, "onnx", "cpu", 1, [1], start_within_s=1e-6)  # slower than its budget
    assert slower.settled.wait(60) and slower.ready
    assert asyncio.run(after_a_long_upload(True, slower)).shape == (1, 2)  # answered, one at a time, as admitted

    release = threading.Event()

    def loading_slowly():
        release.wait(30)
        return bundle

    async def admitted_while_warming() -> np.ndarray:  # a worker starting: the request waits for the model
        warming = ModelRuntime(loading_slowly, "onnx", "cpu", 1, [1], start_within_s=0.4)
        ADMITTED_AT.set((time.perf_counter(), True))
        await asyncio.sleep(0.6)
        release.set()
        await warming.wait_ready(60)
        return await warming.run(warming.predict, pixels)

    assert asyncio.run(admitted_while_warming()).shape == (1, 2)  # counted from the model's readiness
    unbudgeted = ModelRuntime(lambda: bundle, "onnx", "cpu", 1, [1])
    assert unbudgeted.settled.wait(60) and unbudgeted.ready
    answers, ran = asyncio.run(behind_a_slow_call(unbudgeted))
    assert ran == ["slow", "queued"] and answers[1].shape == (1, 2)


def test_the_batched_entry_asks_again_once_when_the_model_loaded_between_refusal_and_question(tmp_path):
    """A model process refuses (503) while its model reloads; when the entry asks why, it is ready: the entry calls
    once more instead of answering `overloaded` (seen: a 503 `overloaded` for a model that had just loaded). A 504
    (the request's time is spent), a second refusal, or a refusal by a model ready since before the call (BentoML's
    own overload 503: a retry would double the work) is not retried."""
    import asyncio
    from http import HTTPStatus
    from types import SimpleNamespace

    from bentoml.exceptions import BentoMLException, ServiceUnavailable

    from transferkit.core.backends import Choice
    from transferkit.core.errors import ModelUnavailable
    from transferkit.service.remote import RemoteModel, classify_retrying

    def model_process(refusals: list[Exception], ready_for_s: float = 0.0):
        calls = []

        async def classify(pixels):
            calls.append(len(pixels))
            if refusals:
                raise refusals.pop(0)
            return np.full((len(pixels), 3), 1 / 3, np.float32)

        async def describe():
            return {"state": "ready", "ready_for_s": ready_for_s}

        return SimpleNamespace(to_async=SimpleNamespace(classify=classify, describe=describe)), calls

    bundle = write_faulty_bundle(tmp_path / "bundle")  # only its manifest is read here
    pixels = np.zeros((2, 32, 32, 3), np.uint8)
    client, calls = model_process([ServiceUnavailable("reloading")])
    remote = RemoteModel("a", lambda: bundle, Choice("onnx", "test"), lambda: client, pipeline=None)
    assert asyncio.run(remote._call(classify_retrying, pixels)).shape == (2, 3) and calls == [2, 2]
    for refusals, ready_for_s, expected_calls in (
            ([ServiceUnavailable("busy"), ServiceUnavailable("busy")], 0.0, 2),
            ([BentoMLException("timed out", error_code=HTTPStatus.GATEWAY_TIMEOUT)], 0.0, 1),
            ([ServiceUnavailable("batcher full")], 60.0, 1)):  # ready all along: BentoML's own overload, no retry
        client, calls = model_process(refusals, ready_for_s)
        remote = RemoteModel("a", lambda: bundle, Choice("onnx", "test"), lambda client=client: client,
                             pipeline=None)
        with pytest.raises(ModelUnavailable) as refused:
            asyncio.run(remote._call(classify_retrying, pixels))
        assert refused.value.reason == "overloaded" and len(calls) == expected_calls


TRACING_PROBE = """
import os
import transferkit.service.service as service
from bentoml._internal.configuration.containers import BentoMLContainer
service.ImageClassifier.to_asgi()  # merges the services' config over BentoML's, as a worker does before serving
excluded = BentoMLContainer.tracing_excluded_urls.get().url_disabled("http://127.0.0.1:3000/predict")
print(excluded, os.environ.get("OTEL_SDK_DISABLED"))
"""


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "True true"),  # no exporter: OpenTelemetry's middleware passes /predict straight through, SDK off
    ({"BENTOML_CONFIG_OPTIONS": "tracing.exporter_type=in_memory"}, "False None"),  # an exporter: as BentoML ships
    ({"OTEL_SDK_DISABLED": "false"}, "False false"),  # asked for explicitly
])
def test_tracing_costs_nothing_unless_an_exporter_is_configured(tmp_path, env, expected):
    environment = {k: v for k, v in os.environ.items() if k not in ("BENTOML_CONFIG_OPTIONS", "OTEL_SDK_DISABLED")}
    result = subprocess.run([sys.executable, "-c", TRACING_PROBE], capture_output=True, text=True, timeout=120,
                            env={**environment, "TRANSFERKIT_MODEL": str(tmp_path), **env})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == expected


# --- the microbatch layout, with the backend `auto` chose --------------------------------------------------------


def test_microbatch_layout_batches_every_image_once_on_the_backend_auto_chose(bundle, trained_run, tmp_path):
    from transferkit.core.manifest import RUNTIME_BACKENDS
    from transferkit.core.predictors import load_bundle
    from transferkit.export.validate import GATES

    env = {"TRANSFERKIT_BACKEND": "auto", "TRANSFERKIT_LAYOUT": "microbatch", "TRANSFERKIT_CACHE_DIR": str(tmp_path)}
    with ready_server(bundle, tmp_path / "microbatch.log", env=env, workers=1, max_batch_size=8) as srv:
        meta = srv.get("/metadata").json()
        chosen = meta["backend"]
        assert meta["layout"]["name"] == "microbatch" and meta["runtime"]["backend"] == chosen
        assert meta["backend_choice"]["setting"] == "auto" and chosen in meta["backend_choice"]["images_per_second"]
        assert meta["batching"]["max_batch_size"] == 8
        files = [path for path, _ in split_files(trained_run.run_dir, "test")[:48]]
        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(lambda p: srv.post("/predict", files=[("images", (
                p.name, p.read_bytes(), "image/png"))]), files))
        batches = srv.get("/metadata").json()["runtime"]["microbatch"]
    predictor = load_bundle(bundle).predictor(chosen, device="cpu")
    # A batch of 8 may round differently from a batch of 1 (bf16): within the precision's batch bound.
    tolerance = GATES[RUNTIME_BACKENDS[chosen].precision].batch_consistency
    for path, response in zip(files, responses):
        assert response.status_code == 200, response.text
        expected = predictor(decode_image(path.read_bytes(), 32)[None])[0]
        assert response.json()[0]["score"] == pytest.approx(float(expected.max()), abs=tolerance)
    assert 1 <= batches["model_calls"] <= 48
    assert batches["images"] == 48  # every image through the batcher once, none twice
