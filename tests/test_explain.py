"""Class activation maps (issue 28, item 2): a second output of every exported graph, validated against Keras at
export, answered by ``predict --explain``, ``POST /explain`` and ``/v2``'s ``cam`` output, drawn in the training
report; heads without an exact map say so.

The bundle here comes from a short real run (MobileNetV2, alpha 0.35, from scratch) at 96 px, so that the map has
3x3 positions (random weights would not do: with BatchNormalization's initial statistics their features vanish and
every answer is a tie).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import InProcessService, local_model
from starlette.testclient import TestClient

from conftest import run_cli, run_cli_here
from transferkit.core.images import decode_image
from transferkit.core.manifest import RUNTIME_BACKENDS, read_manifest
from transferkit.export.validate import CAM_TOLERANCE
from transferkit.service.http import build_app
from transferkit.service.settings import ServiceSettings

SIZE = 96
CLASSES = ["0", "1", "2"]


def _images(data: Path, count: int) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    files = sorted(data.rglob("*.png"))[:count]
    return (np.stack([decode_image(f, SIZE) for f in files]), np.array([int(f.parent.name) for f in files]), files)


def _model(head_kind: str):
    from transferkit.core.backbones import get_backbone
    from transferkit.training.config import HeadConfig
    from transferkit.training.model import build_classifier

    return build_classifier(get_backbone("MobileNetV2"), len(CLASSES), SIZE, "none", HeadConfig(kind=head_kind),
                            alpha=0.35)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from transferkit.training.digits import write_digits

    out = tmp_path_factory.mktemp("data") / "digits"
    write_digits(out, size=SIZE, classes=[0, 1, 2], per_class=60)
    return out


@pytest.fixture(scope="module")
def explained(digits, tmp_path_factory):
    """(the trained Keras model, the run directory, its bundle: onnx and onnx-fp16; the SavedModel's map is checked
    in test_export.py)."""
    from conftest import train_run
    from transferkit.export.bundle import export_run
    from transferkit.training.config import AugmentConfig
    from transferkit.training.model import load_run_model

    base = tmp_path_factory.mktemp("explained")
    run = train_run(base / "run", digits, image_size=SIZE, alpha=0.35, strategy="scratch", epochs=6, batch_size=8,
                    label_smoothing=0.0, augment=AugmentConfig(enabled=False)).run_dir
    export_run(run, base / "bundle", formats=["onnx", "onnx-fp16"], register=False)
    return load_run_model(run), run, base / "bundle"


def test_every_format_carries_the_map_within_its_bound_of_keras(explained):
    _, _, bundle = explained
    manifest = read_manifest(bundle)
    assert manifest.explain.available and manifest.explain.output == "cam" and manifest.explain.resolution == [3, 3]
    assert {entry.cam_output for entry in manifest.formats.values()} == {"cam"}
    for row in manifest.validation.formats:  # the files, and the OpenVINO engine rows this CPU runs
        bound = CAM_TOLERANCE[RUNTIME_BACKENDS[row.format].precision]
        assert row.cam_images >= 20 and row.cam_passed == (row.cam_max_rel_diff <= bound), row.format
        if row.format in manifest.formats:
            assert row.passed and row.cam_passed, (row.format, row.failures, row.cam_max_rel_diff)
    assert "map Δ" in manifest.validation.table()
    assert "- output `cam`: [N, 3, 3], where the model looked" in (bundle / "MODEL_CARD.md").read_text()


def test_a_backend_whose_map_failed_its_bound_refuses_to_explain(explained, tmp_path):
    """A map beyond its bound at export is refused by that backend, in one line naming the fp32 alternative;
    its probabilities are still served."""
    import shutil

    from transferkit.core.errors import NoClassActivationMap
    from transferkit.core.predictors import load_bundle

    copy = tmp_path / "bundle"
    shutil.copytree(explained[2], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    row = next(r for r in manifest["validation"]["formats"] if r["format"] == "onnx-fp16")
    row.update(cam_passed=False, cam_max_rel_diff=0.7)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(copy)
    pixels = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    with pytest.raises(NoClassActivationMap, match="differed from Keras's by 0.70 .* explain with the fp32 backend"):
        bundle.predictor("onnx-fp16").explain(pixels)
    assert bundle.predictor("onnx-fp16")(pixels).shape == (1, 3)
    assert bundle.predictor("onnx").explain(pixels)[1].shape == (1, 3, 3)
    # predict --explain: a backend named by the user is refused in one line; auto's choice falls back to onnx.
    refused = run_cli_here("predict", str(copy), "--backend", "onnx-fp16", "--explain", str(tmp_path / "m"),
                           str(Path(__file__)))
    assert refused.returncode == 2 and "differed from Keras's" in refused.stderr
    from argparse import Namespace

    from transferkit.core.classifier import load_bundle as load_classifier
    from transferkit.core.predict_cli import _explaining

    chosen = _explaining(Namespace(backend="auto", bundle=str(copy), device="auto"),
                         load_classifier(copy, "onnx-fp16"))
    assert chosen.backend == "onnx"
    # A service on onnx-fp16 answers its maps from the fp32 onnx file, loaded at the first one.
    from transferkit.service.errors import ServiceError
    from transferkit.service.http import require_cam
    from transferkit.service.runtime import ModelRuntime

    runtime = ModelRuntime(lambda: copy, "onnx-fp16", "auto", 1, [1])
    assert runtime.settled.wait(60) and runtime.ready, runtime.error
    np.testing.assert_allclose(runtime.explain(pixels)[1], bundle.predictor("onnx").explain(pixels)[1], rtol=1e-6)
    require_cam(load_bundle(copy).manifest, "onnx-fp16")
    # ... and with no format's map within its bound, the route answers 404 with the reason.
    row = next(r for r in manifest["validation"]["formats"] if r["format"] == "onnx")
    row.update(cam_passed=False, cam_max_rel_diff=0.2)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ServiceError) as refused:
        require_cam(load_bundle(copy).manifest, "onnx-fp16")
    assert refused.value.status == 404 and refused.value.reason == "no_class_activation_map"


def test_the_onnx_map_is_the_class_score_spread_over_the_feature_map(explained, digits):
    """The defining identity, checked from outside the export: the top class's logit is the map's mean plus the
    class layer's bias (global average pooling, then the dense layer), computed here with Keras."""
    import keras
    import onnxruntime as ort

    model, _, bundle = explained
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities", "cam"]  # output 0 stays the probabilities
    images, _, _ = _images(digits, 8)
    probabilities, maps = session.run(None, {"image": images})
    head = model.get_layer("head")
    features = keras.Model(model.inputs[0], head._inbound_nodes[0].input_tensors[0])(images.astype(np.float32))
    kernel, bias = head.get_layer("probabilities").get_weights()
    logits = np.asarray(features).mean(axis=(1, 2)) @ kernel + bias
    top = probabilities.argmax(1)
    assert (top == logits.argmax(1)).all()
    np.testing.assert_allclose(maps.mean(axis=(1, 2)) + bias[top], logits[np.arange(len(top)), top], rtol=1e-4,
                               atol=1e-4)


def test_heads_without_an_exact_map_say_why():
    from transferkit.training.cam import find_cam

    source, why = find_cam(_model("flatten"))
    assert source is None and "hidden dense layer ('head_hidden')" in why and "--head flatten" in why


def test_the_report_grid_shows_where_the_model_looked(explained, digits, tmp_path):
    """The training report's grid of misclassified images, drawn with the model, is overlaid with the maps: the
    same grid without them differs (and the run's own report step did not fail)."""
    from transferkit.training import plots
    from transferkit.training.data import SplitData

    model, run, _ = explained
    assert not json.loads((run / "metrics.json").read_text()).get("failures")
    images, _, _ = _images(digits, 6)
    probabilities = np.asarray(model(images.astype(np.float32), training=False))
    every_answer_wrong = SplitData(files=[], labels=(probabilities.argmax(1) + 1) % 3, images=images)
    plots.misclassified(probabilities, every_answer_wrong, CLASSES, tmp_path / "plain.png")
    plots.misclassified(probabilities, every_answer_wrong, CLASSES, tmp_path / "maps.png", model=model)
    plain, maps = (np.asarray(Image.open(tmp_path / name).convert("RGB"), np.int16) for name in ("plain.png",
                                                                                                 "maps.png"))
    assert plain.shape == maps.shape and np.abs(plain - maps).mean() > 5


def test_predict_explain_writes_an_overlay_per_image(explained, digits, tmp_path):
    _, _, bundle = explained
    _, _, files = _images(digits, 5)
    out = tmp_path / "maps"
    result = run_cli("predict", str(bundle), *map(str, files), "--explain", str(out), cwd=digits.parent)
    assert result.returncode == 0, result.stderr
    overlays = sorted(out.rglob("*.cam.png"))
    expected = sorted(out / f.relative_to(digits.parent).with_name(f.name + ".cam.png") for f in files)
    assert overlays == expected
    with Image.open(overlays[0]) as image:
        assert image.format == "PNG" and image.size == (224, 224)  # a 96 px input, enlarged to be seen
    assert "class activation maps" in result.stderr and "5 overlays" in result.stderr

    again = run_cli_here("predict", str(bundle), str(files[0]), "--explain", str(out))
    assert again.returncode == 2 and "exists" in again.stderr and overlays == sorted(out.rglob("*.cam.png"))


def test_predict_explain_refuses_a_bundle_without_maps(bundle, trained_run, tmp_path):
    """A bundle exported before maps existed (schema 3: no ``explain`` in its manifest) is refused in one line,
    before anything is written."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.update(schema_version=3, explain=None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    image = next(Path(trained_run.config["data"]).rglob("*.png"))
    result = run_cli_here("predict", str(old), str(image), "--explain", str(tmp_path / "maps"))
    assert result.returncode == 2 and "exported before transferkit added class activation maps" in result.stderr
    assert not (tmp_path / "maps").exists()


@pytest.fixture(scope="module")
def client(explained):
    settings = ServiceSettings(max_images=4)
    service = InProcessService(local_model(explained[2]))
    return TestClient(build_app(lambda: service, settings, settings.plan(cores=2, gpus=0)))


def test_explain_answers_a_png_overlay_or_the_maps_as_json(client, explained, digits):
    from transferkit.core.predictors import load_bundle

    _, _, files = _images(digits, 3)
    upload = [("images", (f.name, f.read_bytes(), "image/png")) for f in files]
    probabilities, maps = load_bundle(explained[2]).predictor("onnx").explain(
        np.stack([decode_image(f, SIZE) for f in files]))
    png = client.post("/explain", files=upload[:1])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-label"] == CLASSES[probabilities[0].argmax()]
    assert Image.open(io.BytesIO(png.content)).size == (224, 224)
    answers = client.post("/explain?format=json", files=upload).json()
    for answer, row, cam in zip(answers, probabilities, maps):
        assert answer["label"] == CLASSES[row.argmax()] and answer["cam"]["resolution"] == [3, 3]
        np.testing.assert_allclose(answer["cam"]["values"], cam, rtol=1e-5, atol=1e-5)
        assert max(map(max, answer["cam"]["normalized"])) == pytest.approx(1.0)
    for query, files_sent, reason in (("", upload, "one_image_per_png"), ("?format=gif", upload[:1], "bad_format"),
                                      ("?format=json&format=png", upload[:1], "bad_format")):
        refused = client.post("/explain" + query, files=files_sent)
        assert refused.status_code == 400 and refused.json()["reason"] == reason, refused.text


def test_v2_returns_the_cam_output_when_asked(client, explained, digits):
    from transferkit.core.predictors import load_bundle

    _, _, files = _images(digits, 2)
    pixels = np.stack([decode_image(f, SIZE) for f in files])
    probabilities, maps = load_bundle(explained[2]).predictor("onnx").explain(pixels)
    request = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                           "data": pixels.ravel().tolist()}],
               "outputs": [{"name": "cam"}, {"name": "probabilities", "parameters": {"classification": 1}}]}
    name = read_manifest(explained[2]).name
    answer = client.post(f"/v2/models/{name}/infer", json=request).json()
    assert [o["name"] for o in answer["outputs"]] == ["cam", "probabilities"]
    assert answer["outputs"][0]["shape"] == [2, 3, 3]
    np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (2, 3, 3)), maps, rtol=1e-5, atol=1e-5)
    assert [label.split(":")[2] for label in answer["outputs"][1]["data"]] == [CLASSES[i] for i in
                                                                               probabilities.argmax(1)]
    metadata = client.get(f"/v2/models/{name}").json()
    assert {"name": "cam", "datatype": "FP32", "shape": [-1, 3, 3]} in metadata["outputs"]
    twice = client.post(f"/v2/models/{name}/infer", json={**request, "outputs": [{"name": "cam"}] * 2})
    assert twice.status_code == 400 and "twice" in twice.json()["error"]
