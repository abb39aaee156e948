"""The service against a real ``bentoml serve`` subprocess: answers, batching, metrics, and every case of the
serving checklist (shared/reference/serving-checklist.md) with hostile and unusual inputs."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from faulty_bundle import write_faulty_bundle
from PIL import Image
from serving import Server

from transferkit.core.images import decode_image

MAX_BODY_MB = 2
MAX_IMAGES = 4


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    srv = Server(bundle, log, max_body_mb=MAX_BODY_MB, max_images=MAX_IMAGES, max_batch_size=16,
                 max_latency_ms=10_000, top_k=3)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def test_files(trained_run) -> list[tuple[Path, str]]:
    split = json.loads((trained_run.run_dir / "split.json").read_text())
    root = Path(split["root"])
    return [(root / f, item["label"]) for f, item in split["files"].items() if item["split"] == "test"]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def digit(test_files, size: int = 64) -> Image.Image:
    with Image.open(test_files[0][0]) as image:
        return image.convert("RGB").resize((size, size))


def post_images(server, *parts: tuple[str, bytes, str], **kwargs) -> requests.Response:
    files = [("images", (name, data, content_type)) for name, data, content_type in parts]
    return server.post("/predict", files=files, **kwargs)


def assert_error(response: requests.Response, statuses: tuple[int, ...], fragment: str) -> None:
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert fragment.lower() in body["error"].lower(), body
    assert "Traceback" not in response.text and "/work/" not in response.text and "/tmp/" not in response.text


def assert_alive(server, test_files) -> None:
    data = test_files[0][0].read_bytes()
    response = post_images(server, ("ok.png", data, "image/png"))
    assert response.status_code == 200, response.text


# --- answers -----------------------------------------------------------------------------------------------------


def test_predict_answers_like_the_in_process_predictor(server, bundle, test_files):
    from transferkit.export.predictors import load_bundle

    predictor = load_bundle(bundle).predictor("onnx", device="cpu")
    files = test_files[:MAX_IMAGES]
    response = post_images(server, *[(f.name, f.read_bytes(), "image/png") for f, _ in files])
    assert response.status_code == 200, response.text
    answers = response.json()
    expected = predictor(np.stack([decode_image(f.read_bytes(), 32) for f, _ in files]).astype(np.float32))
    assert len(answers) == len(files)
    for answer, probabilities in zip(answers, expected):
        assert set(answer) == {"label", "score", "top_k"}
        assert len(answer["top_k"]) == 3  # TRANSFERKIT_TOP_K=3 (and only 3 classes)
        assert answer["label"] == ["0", "1", "7"][int(probabilities.argmax())]
        assert answer["score"] == pytest.approx(float(probabilities.max()), abs=1e-6)
        assert sum(item["score"] for item in answer["top_k"]) == pytest.approx(1.0, abs=1e-4)
    accuracy = np.mean([a["label"] == label for a, (_, label) in zip(answers, files)])
    assert accuracy >= 0.75  # the trained run is ~90% accurate


def test_metadata_describes_model_runtime_and_limits(server, bundle):
    from transferkit.core.manifest import read_manifest

    manifest = read_manifest(bundle)
    meta = server.get("/metadata").json()
    assert meta["name"] == "digits-test" and meta["version"] == manifest.version
    assert meta["backbone"] == "MobileNetV2" and meta["classes"] == ["0", "1", "7"] and meta["image_size"] == 32
    assert meta["backend"] == "onnx" and meta["runtime"]["provider"] == "CPUExecutionProvider"
    assert meta["runtime"]["warmup_batch_sizes"] == [1, 2, 4, 8, 16]
    # On CPU: one model process per core (at most 4), each with its own batcher, the cores shared among them.
    cores = len(os.sched_getaffinity(0))
    workers = min(cores, 4)
    assert meta["batching"] == {"max_batch_size": 16, "max_latency_ms": 10_000, "model_workers": workers}
    assert meta["runtime"]["model_workers"] == workers
    assert meta["runtime"]["threads_per_worker"] == max(1, cores // workers)
    assert meta["limits"]["max_images_per_request"] == MAX_IMAGES
    assert meta["checksums"]["onnx"] == manifest.formats["onnx"].sha256


def test_concurrent_clients_are_batched_and_answered_exactly(server, bundle, test_files):
    from transferkit.export.predictors import load_bundle

    predictor = load_bundle(bundle).predictor("onnx", device="cpu")
    files = [f for f, _ in test_files[:48]]

    def one(path: Path):
        return path, post_images(server, (path.name, path.read_bytes(), "image/png"))

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, files))
    for path, response in results:
        assert response.status_code == 200, response.text
        expected = predictor(decode_image(path.read_bytes(), 32)[None].astype(np.float32))[0]
        assert response.json()[0]["score"] == pytest.approx(float(expected.max()), abs=1e-5)
    metrics = server.get("/metrics").text
    sums = [float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith("bentoml_service_adaptive_batch_size_sum")]
    counts = [float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("bentoml_service_adaptive_batch_size_count")]
    assert sum(counts) > 0, metrics[:2000]
    assert sum(sums) / sum(counts) > 1.0  # some model calls carried images from several requests
    assert "transferkit_images_predicted_total" in metrics


# --- the checklist -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,data", [
    ("notes.txt", b"hello, this is not an image\n" * 20),
    ("archive.zip", b"PK\x03\x04" + bytes(200)),
    ("doc.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"),
    ("random.jpg", np.random.default_rng(0).bytes(5000)),
])
def test_1_non_images_are_400(server, test_files, name, data):
    assert_error(post_images(server, (name, data, "image/jpeg")), (400, 415), "not a supported image")
    assert_alive(server, test_files)


def test_2_truncated_and_corrupt_images_are_400(server, test_files):
    jpeg = encode(digit(test_files, 256), "JPEG", quality=90)
    assert_error(post_images(server, ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")), (400,), "images[0]")
    png = bytearray(encode(digit(test_files), "PNG"))
    idat = png.find(b"IDAT")
    png[idat + 10 : idat + 30] = bytes(20)  # break the compressed stream (and its CRC)
    assert_error(post_images(server, ("broken.png", bytes(png), "image/png")), (400,), "images[0]")
    assert_alive(server, test_files)


def _png_bomb(width: int, height: int) -> bytes:
    """A few hundred bytes whose header declares width x height pixels."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000))) + \
        chunk(b"IEND", b"")


def test_3_decompression_bomb_is_refused_from_the_header(server, test_files):
    start = time.perf_counter()
    response = post_images(server, ("bomb.png", _png_bomb(30000, 30000), "image/png"))
    assert_error(response, (400, 413), "image too large")
    assert "30000" in response.json()["error"]
    assert time.perf_counter() - start < 5  # refused without allocating 2.7 GB
    assert_alive(server, test_files)


def test_4_body_cap_with_and_without_content_length(server, test_files):
    cap = MAX_BODY_MB * 1024 * 1024
    big = bytes(cap + 1024)
    assert_error(post_images(server, ("big.png", big, "image/png")), (413,), "too large")

    def chunked():
        for _ in range(40):
            yield b"x" * (cap // 20)

    response = server.post("/predict", data=chunked(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert_error(response, (413,), "too large")

    noise = np.random.default_rng(1).integers(0, 256, (800, 859, 3), dtype=np.uint8)
    just_under = encode(Image.fromarray(noise), "PNG")
    assert cap - 64 * 1024 < len(just_under) < cap - 1024, len(just_under)
    assert post_images(server, ("noise.png", just_under, "image/png")).status_code == 200
    assert_alive(server, test_files)


def test_5_wrong_or_missing_content(server, test_files):
    assert_error(server.post("/predict", json={"images": ["a.jpg"]}), (415,), "expected multipart/form-data")
    assert_error(server.post("/predict", data="hello", headers={"Content-Type": "text/plain"}), (415,),
                 "expected multipart/form-data")
    assert_error(server.post("/predict"), (415,), "expected multipart/form-data")
    assert_error(server.post("/predict", files=[("photo", ("a.png", b"x", "image/png"))]), (400,),
                 "unexpected form field")
    response = server.post("/predict", files={"images": (None, '"https://example.com/cat.jpg"')})
    assert_error(response, (400,), "must be a file upload")
    assert_error(post_images(server, ("empty.jpg", b"", "image/jpeg")), (400,), "empty (0 bytes)")
    assert_alive(server, test_files)


@pytest.mark.parametrize("content_type", ["image/jpeg", "image/jpg", "application/octet-stream", "text/plain"])
def test_6_content_type_is_ignored_bytes_decide(server, test_files, content_type):
    png = test_files[0][0].read_bytes()
    assert post_images(server, ("x.jpg", png, content_type)).status_code == 200
    tiff = encode(digit(test_files), "TIFF")
    assert_error(post_images(server, ("x.png", tiff, "image/png")), (400, 415), "not a supported image")


def _unusual_images(base: Image.Image) -> dict[str, bytes]:
    cmyk = base.convert("CMYK")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    sixteen = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)
    frames = [base, base.rotate(90), base.rotate(180)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    return {
        "grayscale.png": encode(base.convert("L"), "PNG"),
        "palette.png": encode(base.convert("P"), "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "cmyk.jpg": encode(cmyk, "JPEG"),
        "sixteen-bit.png": encode(sixteen, "PNG"),
        "animated.gif": animated.getvalue(),
        "image.webp": encode(base, "WEBP"),
        "image.bmp": encode(base, "BMP"),
        "exif-rotated.jpg": encode(base, "JPEG", exif=exif.tobytes()),
        "one-pixel.png": encode(Image.new("RGB", (1, 1), (40, 40, 40)), "PNG"),
        "ten-thousand-by-one.png": encode(Image.new("RGB", (10000, 1), (200, 10, 10)), "PNG"),
    }


def test_7_unusual_valid_images_are_answered_like_training_decodes_them(server, bundle, test_files):
    from transferkit.export.predictors import load_bundle

    predictor = load_bundle(bundle).predictor("onnx", device="cpu")
    for name, data in _unusual_images(digit(test_files)).items():
        response = post_images(server, (name, data, "application/octet-stream"))
        assert response.status_code == 200, (name, response.text)
        expected = predictor(decode_image(data, 32)[None].astype(np.float32))[0]
        assert response.json()[0]["score"] == pytest.approx(float(expected.max()), abs=1e-5), name
    exif_pixels = decode_image(_unusual_images(digit(test_files))["exif-rotated.jpg"], None)
    plain_pixels = decode_image(encode(digit(test_files), "JPEG"), None)
    assert np.abs(exif_pixels.astype(int) - np.rot90(plain_pixels, -1).astype(int)).mean() < 3


def test_8_too_many_images_in_one_request(server, test_files):
    png = test_files[0][0].read_bytes()
    response = post_images(server, *[("x.png", png, "image/png")] * (MAX_IMAGES + 1))
    assert_error(response, (400, 413), f"at most {MAX_IMAGES} images")
    response = post_images(server, *[("x.png", png, "image/png")] * (MAX_IMAGES + 10))
    assert_error(response, (400, 413), f"at most {MAX_IMAGES} images")


def test_one_bad_image_fails_only_its_own_request(server, test_files):
    good = test_files[0][0].read_bytes()

    def send(i: int):
        if i % 3 == 0:
            return post_images(server, ("bad.jpg", b"garbage" * 10, "image/jpeg")).status_code
        return post_images(server, ("good.png", good, "image/png")).status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(send, range(36)))
    assert statuses.count(400) == 12 and statuses.count(200) == 24


def test_15_malformed_protocol(server, test_files):
    response = server.post("/predict", data=b"--nope\r\ngarbage",
                           headers={"Content-Type": "multipart/form-data; boundary=other"})
    assert response.status_code == 400, response.text
    assert server.get("/no-such-route").status_code == 404
    assert_error(server.get("/predict"), (405,), "method not allowed")
    assert requests.put(server.url + "/predict", timeout=10).status_code == 405
    huge_json = b'{"images": "' + b"a" * (3 * 1024 * 1024) + b'"}'
    assert server.post("/predict", data=huge_json, headers={"Content-Type": "application/json"}).status_code == 413
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        reply = sock.recv(100)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400")  # a 400 or a closed connection, then still alive
    assert_alive(server, test_files)


def test_metrics_count_rejections_by_reason(server, test_files):
    png = test_files[0][0].read_bytes()
    post_images(server, ("bad.jpg", b"garbage" * 10, "image/jpeg"))
    post_images(server, ("bomb.png", _png_bomb(30000, 30000), "image/png"))
    post_images(server, ("big.png", bytes(MAX_BODY_MB * 1024 * 1024 + 1), "image/png"))
    post_images(server, *[("x.png", png, "image/png")] * (MAX_IMAGES + 1))
    post_images(server, ("empty.png", b"", "image/png"))
    metrics = server.get("/metrics").text
    for reason in ("invalid_image", "image_too_large", "body_too_large", "too_many_images", "empty_file"):
        assert f'reason="{reason}"' in metrics, reason
    assert "bentoml_service_request_total" in metrics or "bentoml_api_server_request_total" in metrics


# --- faults of the model and the lifecycle ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    bundle_dir = write_faulty_bundle(tmp_path_factory.mktemp("faulty") / "bundle")
    srv = Server(bundle_dir, tmp_path_factory.mktemp("logs") / "faulty.log", timeout_s=1, max_batch_size=4)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _gray(value: int) -> bytes:
    return encode(Image.new("RGB", (32, 32), (value, value, value)), "PNG")


def test_10_non_finite_output_is_a_counted_5xx_never_null(faulty):
    assert faulty.post("/predict", files=[("images", ("dark.png", _gray(30), "image/png"))]).status_code == 200
    response = faulty.post("/predict", files=[("images", ("gray.png", _gray(160), "image/png"))])
    assert response.status_code == 500
    assert "non-finite" in response.json()["error"] and "null" not in response.text
    assert "transferkit_nonfinite_outputs_total 1.0" in faulty.get("/metrics").text
    assert faulty.post("/predict", files=[("images", ("dark.png", _gray(30), "image/png"))]).status_code == 200


def test_12_slow_inference_times_out_with_504_and_the_next_request_is_served(faulty):
    start = time.perf_counter()
    response = faulty.post("/predict", files=[("images", ("white.png", _gray(250), "image/png"))])
    assert response.status_code == 504, response.text
    assert time.perf_counter() - start < 5
    time.sleep(2)  # let the slow model call finish
    assert faulty.post("/predict", files=[("images", ("dark.png", _gray(30), "image/png"))]).status_code == 200


def test_11_overload_gives_only_429_or_503_and_probes_stay_up(bundle, tmp_path):
    srv = Server(bundle, tmp_path / "overload.log", max_concurrency=2, max_latency_ms=50, max_batch_size=2)
    try:
        srv.wait_ready()
        png = encode(Image.new("RGB", (3000, 2000), (20, 20, 20)), "PNG")  # slow to decode: requests pile up
        statuses: list[int] = []
        probes: list[int] = []

        def probe():
            for _ in range(10):
                probes.append(srv.get("/livez").status_code)
                time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda _: post_images(srv, ("x.png", png, "image/png")).status_code,
                                     range(32)))
        prober.join()
        assert set(statuses) <= {200, 429, 503}, statuses
        assert statuses.count(429) + statuses.count(503) > 0, statuses
        assert set(probes) == {200}
    finally:
        srv.stop()


def test_13_readiness_follows_loading_and_sigterm_lets_in_flight_requests_finish(tmp_path):
    bundle_dir = write_faulty_bundle(tmp_path / "bundle")
    srv = Server(bundle_dir, tmp_path / "lifecycle.log", timeout_s=30)
    try:
        srv.wait_listening()
        # The first answer of /readyz comes before or after the model is warm; it is 200 only once it is.
        assert srv.get("/readyz").status_code in (200, 503)
        assert srv.get("/livez").status_code == 200
        srv.wait_ready()
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(srv.post, "/predict", files=[("images", ("w.png", _gray(250), "image/png"))])
                       for _ in range(3)]
            time.sleep(0.5)  # the slow model is now busy with them
            srv.terminate()
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert srv.process.wait(30) == 0
    finally:
        srv.stop()


def test_14_tampered_bundle_never_becomes_ready(bundle, tmp_path):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 3] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    srv = Server(copy, tmp_path / "tampered.log")
    try:
        srv.wait_listening()
        deadline = time.monotonic() + 20
        while "refusing to serve" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "does not match its manifest checksum" in srv.log()
        assert srv.get("/livez").status_code == 200
        assert srv.get("/readyz").status_code == 503
        response = srv.post("/predict", files=[("images", ("x.png", _gray(30), "image/png"))])
        assert response.status_code == 503
    finally:
        srv.stop()


def test_bentoml_build_packs_service_model_and_dockerfile(bundle):
    """Offline: no lock step, pinned requirements; the model referenced so that it is packed."""
    import os
    import subprocess
    import sys

    import yaml
    from serving import ROOT

    from transferkit.core.manifest import read_manifest

    env = {**os.environ, "TRANSFERKIT_MODEL": "digits-test:latest", "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", str(ROOT), "--output", "tag"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = Path(os.environ["BENTOML_HOME"]) / "bentos" / name / version
    assert (bento / "env" / "docker" / "Dockerfile").is_file()
    assert (bento / "src" / "service" / "service.py").is_file()
    assert (bento / "src" / "transferkit" / "core" / "images.py").is_file()
    requirements = [line for line in (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert any(line.startswith("onnxruntime-gpu[cuda,cudnn]==") for line in requirements)
    assert not any(line.startswith(("tensorflow", "onnxruntime==")) for line in requirements)
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    models = [m["tag"] for service in info["services"] for m in service.get("models", [])]
    assert f"digits-test:{read_manifest(bundle).version}" in models


def test_service_code_does_not_import_tensorflow_for_onnx(bundle):
    import os
    import subprocess
    import sys

    code = ("import sys, transferkit.service.service; from transferkit.export.predictors import load_bundle; "
            f"load_bundle({str(bundle)!r}).predictor('onnx')(__import__('numpy').zeros((1, 32, 32, 3), 'float32')); "
            "bad = {'tensorflow', 'keras'} & set(sys.modules); assert not bad, bad")
    env = {**os.environ, "TRANSFERKIT_MODEL": str(bundle)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
