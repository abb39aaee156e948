"""The export stage against real runtimes: a real training run exported through the CLI, reloaded by an
independent onnxruntime session and by ``tf.saved_model.load``, tampered with, interrupted; and one member of every
backbone family exported and validated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import last_error_line, run_cli, run_cli_here
from transferkit.core.errors import BundleError, ExportValidationError
from transferkit.core.images import decode_image
from transferkit.core.manifest import read_manifest
from transferkit.training.rundir import split_files


def _test_images(run_dir: Path, size: int) -> tuple[np.ndarray, list[str]]:
    """The run's test images as uint8 pixels (what every schema-2 format takes) and their class names."""
    files = split_files(run_dir, "test")
    return np.stack([decode_image(path, size) for path, _ in files]), [label for _, label in files]


def test_bundle_holds_every_format_and_a_manifest(bundle):
    manifest = read_manifest(bundle)
    assert set(manifest.formats) == {"savedmodel", "onnx", "onnx-fp16"}
    assert manifest.backbone == "MobileNetV2" and manifest.image_size == 32
    assert manifest.class_names == ["0", "1", "7"]
    assert manifest.preprocessing["mode"] == "tf"
    assert manifest.validation.passed and not manifest.validation_overridden
    assert manifest.validation.images >= 64  # test split topped up from val
    assert manifest.schema_version == 4
    for entry in manifest.formats.values():
        assert (bundle / entry.file).exists()
        assert entry.input_name == "image" and entry.output_name == "probabilities"
        assert entry.input_dtype == "uint8" and entry.output_dtype == "float32"
        assert len(entry.sha256) == 64 and entry.bytes > 0
    assert manifest.formats["onnx"].opset == 17
    assert "tensorflow" in manifest.versions and "tf2onnx" in manifest.versions
    from importlib.metadata import version

    assert manifest.versions["pillow"] == manifest.resize.library_version == version("pillow")
    assert not list(bundle.parent.glob(".digits.partial-*"))


def test_every_openvino_backend_this_cpu_runs_is_validated_on_the_trained_bundle(bundle):
    """The engine rows: one per OpenVINO backend whose file is in the bundle and whose precision this CPU runs
    natively (none without OpenVINO), each passing on a model that learned."""
    from transferkit.export.validate import engine_backends

    manifest = read_manifest(bundle)
    rows = {f.format: f for f in manifest.validation.formats if f.format.startswith("openvino")}
    assert sorted(rows) == sorted(engine_backends(manifest.formats))
    for name, row in rows.items():
        assert row.passed and row.max_abs_diff <= 0.2, (name, row.failures)


def test_fp16_is_half_the_size(bundle):
    m = read_manifest(bundle).formats
    ratio = m["onnx-fp16"].bytes / m["onnx"].bytes
    assert 0.4 < ratio < 0.6, ratio


def test_independent_runtimes_reproduce_keras(bundle, trained_run):
    """Plain onnxruntime and tf.saved_model.load, without transferkit's loader, on the run's test images."""
    import onnxruntime as ort
    import tensorflow as tf

    from transferkit.export import validate
    from transferkit.training.evaluate import batched_forward
    from transferkit.training.model import load_run_model

    images, _ = _test_images(trained_run.run_dir, 32)
    keras_p = batched_forward(load_run_model(trained_run.run_dir), images.astype(np.float32))

    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].type == "tensor(uint8)"  # the cast to float32 is inside the graph
    # The probabilities first; then the top class's activation map (tests/test_explain.py), at 32 px one position.
    assert [(o.name, o.shape[1:]) for o in session.get_outputs()] == [("probabilities", [3]), ("cam", [1, 1])]
    assert session.get_inputs()[0].shape[0] != 1  # dynamic batch axis
    onnx_p = session.run(None, {"image": images})[0]
    assert np.abs(onnx_p - keras_p).max() <= 1e-4
    assert (onnx_p.argmax(1) == keras_p.argmax(1)).all()
    single = session.run(None, {"image": images[:1]})[0]
    assert np.abs(single - onnx_p[:1]).max() <= 1e-5

    loaded = tf.saved_model.load(str(bundle / "saved_model"))
    sm_outputs = loaded.signatures["serving_default"](image=tf.constant(images))
    sm_p = sm_outputs["probabilities"].numpy()
    assert np.abs(sm_p - keras_p).max() <= 1e-4
    onnx_cam = session.run(["cam"], {"image": images})[0]  # the SavedModel computes the same map as the ONNX file
    np.testing.assert_allclose(sm_outputs["cam"].numpy(), onnx_cam, rtol=1e-4, atol=1e-4 * np.abs(onnx_cam).max())
    assert (sm_p.argmax(1) == keras_p.argmax(1)).all()

    fp16 = ort.InferenceSession(str(bundle / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    assert fp16.get_inputs()[0].type == "tensor(uint8)"  # uint8 in, float32 out; fp16 inside
    assert fp16.get_outputs()[0].type == "tensor(float)"
    fp16_p = fp16.run(None, {"image": images})[0]
    assert np.abs(fp16_p - keras_p).max() <= validate.GATES["fp16"].tolerance


def test_bundle_is_registered_in_the_bentoml_store(bundle):
    import bentoml

    manifest = read_manifest(bundle)
    model = bentoml.models.get(f"digits-test:{manifest.version}")
    assert Path(os.environ["BENTOML_HOME"]) in Path(model.path).parents
    assert model.info.metadata["backbone"] == "MobileNetV2"
    assert read_manifest(Path(model.path)).formats == manifest.formats

    from transferkit.core.predictors import load_bundle

    by_tag = load_bundle("digits-test:latest")
    assert by_tag.manifest.version == manifest.version


@pytest.mark.parametrize("backend", ["onnx", "onnx-fp16", "savedmodel"])
def test_loader_predictors_answer_alike(bundle, trained_run, backend):
    from transferkit.core.predictors import load_bundle
    from transferkit.export import validate

    images, _ = _test_images(trained_run.run_dir, 32)
    images = images.astype(np.float32)  # float pixels from an older caller are still accepted
    loaded = load_bundle(bundle)
    reference = loaded.predictor("onnx", device="cpu")(images)
    predictor = loaded.predictor(backend, device="cpu")
    assert predictor.provider in ("CPUExecutionProvider", "TF:CPU")
    probabilities = predictor(images)
    assert probabilities.shape == (len(images), 3) and np.isfinite(probabilities).all()
    assert np.allclose(probabilities.sum(1), 1, atol=1e-3)
    assert np.abs(probabilities - reference).max() <= validate.GATES["fp16"].tolerance  # fp32: far inside it


@pytest.mark.parametrize("target", ["model.onnx", "model.fp16.onnx", "saved_model/saved_model.pb", "manifest"])
def test_a_flipped_byte_makes_the_loader_refuse(bundle, tmp_path, target):
    from transferkit.core.predictors import load_bundle

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    if target == "manifest":
        (copy / "manifest.json").write_text('{"schema_version": 1, "name": ')
        expected = "not a valid bundle manifest"
    else:
        path = copy / target
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        expected = "does not match its manifest checksum"
    with pytest.raises(BundleError, match=expected):
        load_bundle(copy)
    result = run_cli("predict", str(copy), str(bundle / "manifest.json"))
    assert result.returncode == 2 and expected in last_error_line(result)
    assert "Traceback" not in result.stderr


def test_truncated_and_missing_files_are_refused(bundle, tmp_path):
    from transferkit.core.predictors import load_bundle

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    path = copy / "model.fp16.onnx"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(copy)
    path.unlink()
    with pytest.raises(BundleError, match="model.fp16.onnx is missing"):
        load_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(copy)


def test_predict_prints_json_and_reports_bad_files(bundle, trained_run, tmp_path):
    files = split_files(trained_run.run_dir, "test")[:3]
    result = run_cli("predict", str(bundle), *[str(f) for f, _ in files], "--top-k", "3")
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert len(answers) == 3
    for answer in answers:
        assert answer["label"] in ["0", "1", "7"]
        assert len(answer["top_k"]) == 3 and answer["top_k"][0]["label"] == answer["label"]
        assert answer["top_k"][0]["score"] >= answer["top_k"][1]["score"]

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(files[0][0].read_bytes()[:60])
    result = run_cli("predict", str(bundle), str(files[0][0]), str(corrupt))
    assert result.returncode == 2
    answers = json.loads(result.stdout)
    assert "label" in answers[0] and "error" in answers[1]
    assert "corrupt.png" in last_error_line(result)


def test_export_errors_are_one_line_before_work(bundle, trained_run, tmp_path):
    cases = [
        (["export", str(tmp_path / "nope"), "--out", str(tmp_path / "b")], "does not exist"),
        (["export", str(trained_run.run_dir), "--out", str(bundle)], "--force"),
        (["export", str(trained_run.run_dir), "--out", str(tmp_path / "b"), "--formats", "onnx,tflite"],
         "--formats"),
        (["export", str(trained_run.run_dir), "--out", str(tmp_path / "b"), "--opset", "9"], "opsets 14 to 18"),
        (["predict", "no-such-model", str(bundle / "manifest.json")], "no bundle directory and no BentoML model"),
        (["predict", str(bundle), str(tmp_path / "missing.png")], "no such file"),
    ]
    for args, expected in cases:
        result = run_cli_here(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in last_error_line(result), (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists()


def test_moved_dataset_needs_data_flag(trained_run, tmp_path):
    from transferkit.training.rundir import read_split, write_split

    moved = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, moved)
    record = read_split(moved)
    record.root = str(tmp_path / "gone")
    write_split(moved, record)
    result = run_cli_here("export", str(moved), "--out", str(tmp_path / "b"), "--no-register")
    assert result.returncode == 2 and "--data DIR" in last_error_line(result)


def test_sigterm_during_export_leaves_no_bundle_and_no_store_entry(trained_run, tmp_path):
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "transferkit", "export", str(trained_run.run_dir), "--out", str(out),
         "--name", "interrupted"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in process.stdout:  # wait until the bundle is being written
        if line.startswith("writing onnx"):
            break
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 143
    assert not out.exists()
    assert not list(tmp_path.glob(".interrupted.*"))
    import bentoml
    from bentoml.exceptions import NotFound

    with pytest.raises(NotFound):
        bentoml.models.get("interrupted:latest")


def test_failing_gate_publishes_nothing_unless_allowed(trained_run, tmp_path, monkeypatch):
    """A zero tolerance makes the real ONNX export fail its gate (its |Δp| is ~1e-7, not 0)."""
    from transferkit.export import validate
    from transferkit.export.bundle import export_run

    monkeypatch.setitem(validate.FP32_MAX_ABS_DIFF_OVERRIDES, "MobileNetV2", 0.0)
    out = tmp_path / "strict"
    with pytest.raises(ExportValidationError, match="max |Δp|"):
        export_run(trained_run.run_dir, out, ["onnx"], name="strict", log=lambda line: None)
    assert not out.exists() and not list(tmp_path.iterdir())
    result = export_run(trained_run.run_dir, out, ["onnx"], register=False, allow_mismatch=True,
                        log=lambda line: None)
    manifest = read_manifest(out)
    assert manifest.validation_overridden and not manifest.validation.passed
    assert result.tag is None


# ------------------------------------------------------------------------------------------------------------------
# The gates, each side shown with a model built so that the verdict is far from any threshold.

def _colour_images(per_class: int = 32, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose class is their dominant channel (red 0, green 1, blue 2): 200-255 there, 0-50 elsewhere."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label in range(3):
        pixels = rng.integers(0, 51, (per_class, size, size, 3))
        pixels[..., label] = rng.integers(200, 256, (per_class, size, size))
        images.append(pixels.astype(np.uint8))
        labels += [label] * per_class
    return np.concatenate(images), np.array(labels)


def _channel_classifier(kernel: np.ndarray, bias: np.ndarray, scale: float = 1 / 255, logit_scale: float = 1.0,
                        size: int = 8):
    """image -> per-channel mean * ``scale`` -> dense(kernel, bias) * ``logit_scale`` -> softmax (a Keras model)."""
    import keras

    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    x = keras.layers.Rescaling(scale)(x)
    dense = keras.layers.Dense(kernel.shape[1])
    x = dense(x)
    dense.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    x = keras.layers.Rescaling(logit_scale)(x)
    return keras.Model(inputs, keras.layers.Softmax()(x))


def _export(model, images, labels, formats, tmp_path, calibration=None):
    from transferkit.export.bundle import ValidationImages, export_model

    result = export_model(model, out=tmp_path / "bundle", backbone="MobileNetV2", image_size=images.shape[1],
                          class_names=["red", "green", "blue"], validation=ValidationImages(images, labels, "colours"),
                          calibration=calibration, formats=formats, register=False, allow_mismatch=True)
    return {f.format: f for f in result.manifest.validation.formats}


def test_fp16_near_ties_flip_but_the_conversion_passes(tmp_path):
    """A model that cannot decide: for red images, class 1 ("green") beats class 0 because its weight is 8.001
    instead of 8. Float16 stores both as 8 (its step there is 1/128), so the two logits become identical and every
    red image flips to class 0; against labels that say class 1 the raw accuracy drops by half. The flips sit inside
    the measured error bound, the conversion is right: passed."""
    kernel = np.array([[8.0, 8.001, 0.0], [0.0, 0.0, 8.0], [0.0, 0.0, 0.0]])
    model = _channel_classifier(kernel, np.zeros(3))
    images, labels = _colour_images()
    images, labels = images[labels < 2], np.where(labels[labels < 2] == 0, 1, 2)  # red -> 1, green -> 2
    fp16 = _export(model, images, labels, ["onnx-fp16"], tmp_path)["onnx-fp16"]
    assert fp16.passed, fp16.failures
    assert fp16.top1_agreement <= 0.75 and fp16.accuracy <= fp16.keras_accuracy - 0.25  # the red images flipped
    assert fp16.decisive_images == 32 and fp16.decisive_agreement == 1.0  # the green ones, all kept
    assert fp16.accuracy_change == 0 and fp16.max_abs_diff <= 1e-2
    onnx = _export(model, images, labels, ["onnx"], tmp_path / "fp32")["onnx"]
    assert onnx.passed and onnx.top1_agreement == 1.0  # in float32 the 1e-3 is kept: nothing flips


def test_fp16_weights_beyond_its_range_fail_and_an_overflow_to_inf_fails(tmp_path):
    """Weights of 8e4 scaled by 1e-4 afterwards: exact in float32, beyond float16's range (max 65504). The converter
    clips them to 1e4, so the float16 file answers with an eighth of the logits: its error bound fails the gate.
    Written naively (a plain cast), the same weights become inf and the answers NaN: that fails too. (On a CPU,
    onnxruntime computes float16 graphs in float32, so the overflow shows through the stored weights.)"""
    import onnx
    from onnx import numpy_helper

    from transferkit.export.validate import validate_bundle

    model = _channel_classifier(np.eye(3) * 8e4, np.zeros(3), logit_scale=1e-4)
    images, labels = _colour_images()
    result = _export(model, images, labels, ["onnx", "onnx-fp16"], tmp_path)
    assert result["onnx"].passed, result["onnx"].failures
    clipped = result["onnx-fp16"]
    assert not clipped.passed and clipped.max_abs_diff > 0.3
    assert clipped.failures[0].startswith("max |Δp|")

    broken = onnx.load(str(tmp_path / "bundle" / "model.onnx"))
    for tensor in broken.graph.initializer:  # weights through a naive float16 cast (no clipping): 8e4 -> inf
        weights = numpy_helper.to_array(tensor).astype(np.float16).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(weights, tensor.name))
    (tmp_path / "naive").mkdir()
    onnx.save(broken, str(tmp_path / "naive" / "model.fp16.onnx"))
    entry = read_manifest(tmp_path / "bundle").formats["onnx-fp16"]
    reference = model(images.astype(np.float32)).numpy()
    naive = validate_bundle(tmp_path / "naive", {"onnx-fp16": entry}, reference, images, labels, "colours",
                            "MobileNetV2").formats[0]
    assert not naive.passed and naive.failures[0].startswith("non-finite probabilities")


def test_a_perturbed_weight_fails_every_gate(trained_run, bundle, tmp_path):
    """The real exported model with its classifier's classes rotated (kernel columns and bias 0->1->2->0): a broken
    conversion whose every answer changes, whatever the trained model's accuracy."""
    import onnx
    from onnx import numpy_helper

    from transferkit.export.bundle import run_images
    from transferkit.export.validate import top1_margins, validate_bundle
    from transferkit.training.evaluate import batched_forward
    from transferkit.training.model import load_run_model

    model = onnx.load(str(bundle / "model.onnx"))
    kernels = [t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[1] == 3]
    biases = [t for t in model.graph.initializer if list(t.dims) == [3]]
    assert len(kernels) == 1 and len(biases) == 1
    for tensor in (kernels[0], biases[0]):
        rotated = numpy_helper.to_array(tensor)[..., [1, 2, 0]]
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(rotated), tensor.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    manifest = read_manifest(bundle)
    validation, _ = run_images(trained_run.run_dir, 32, manifest.class_names)
    reference = batched_forward(load_run_model(trained_run.run_dir), validation.images.astype(np.float32))
    report = validate_bundle(tmp_path, {"onnx": manifest.formats["onnx"]}, reference, validation.images,
                             validation.labels, validation.source, "MobileNetV2").formats[0]
    # The logits are permuted, so the probabilities are: each image's top class loses at least its margin, and no
    # decisive image keeps its answer.
    assert not report.passed
    assert report.max_abs_diff >= top1_margins(reference).max() - 1e-6 > 1e-4
    assert report.decisive_images > 0 and report.decisive_agreement == 0.0
    assert any(f.startswith("max |Δp|") for f in report.failures)
    assert any("decisive images" in f for f in report.failures)


def test_int8_gate_passes_a_model_that_quantizes_well(tmp_path):
    """The class is the dominant channel; activations span 0-1 and margins are wide: int8 keeps every answer."""
    model = _channel_classifier(np.eye(3) * 8, np.zeros(3))
    images, labels = _colour_images()
    int8 = _export(model, images, labels, ["onnx-int8"], tmp_path, calibration=images)["onnx-int8"]
    assert int8.passed, int8.failures
    assert int8.checker == "onnx.checker ok" and int8.accuracy == int8.keras_accuracy == 1.0
    assert not (tmp_path / "bundle" / "model.onnx").exists()  # only the asked-for formats are kept
    from transferkit.core.predictors import load_bundle

    predictor = load_bundle(tmp_path / "bundle").predictor("onnx-int8", device="cpu")
    assert (predictor(images).argmax(1) == labels).all()


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_int8_calibration_methods_other_than_minmax_quantize_and_pass(tmp_path, method):
    from transferkit.core.manifest import read_manifest
    from transferkit.export.bundle import ValidationImages, export_model

    images, labels = _colour_images()
    result = export_model(_channel_classifier(np.eye(3) * 8, np.zeros(3)), out=tmp_path / "bundle",
                          backbone="MobileNetV2", image_size=8, class_names=["red", "green", "blue"],
                          validation=ValidationImages(images, labels, "colours"), calibration=images,
                          formats=["onnx-int8"], register=False, int8_method=method)
    int8 = {f.format: f for f in result.manifest.validation.formats}["onnx-int8"]
    assert int8.passed and int8.accuracy == 1.0, int8.failures
    assert read_manifest(tmp_path / "bundle").formats["onnx-int8"].quantization["method"] == method


def _loud_channel_classifier():
    """One activation of the classifier's input reaches 1e4 (blue mean * 1e4, weighted by zero): per-tensor int8
    then has a step of about 40, and the red/green/blue means (0-1) that decide the class all round to zero."""
    import keras

    inputs = keras.Input((8, 8, 3), name="image")
    means = keras.layers.Rescaling(1 / 255)(keras.layers.GlobalAveragePooling2D()(inputs))
    outlier = keras.layers.Dense(1, use_bias=False)
    loud = outlier(means)
    outlier.set_weights([np.array([[0.0], [0.0], [1e4]], np.float32)])
    dense = keras.layers.Dense(3)
    logits = dense(keras.layers.Concatenate(name="meet")([means, loud]))
    dense.set_weights([np.vstack([np.eye(3) * 8, np.zeros((1, 3))]).astype(np.float32), np.zeros(3, np.float32)])
    return keras.Model(inputs, keras.layers.Softmax()(logits))


def test_int8_gate_fails_a_model_whose_activation_range_quantization_destroys(tmp_path, monkeypatch):
    from transferkit.export import quantize

    monkeypatch.setattr(quantize, "EXCLUDE_ROUNDS", ())  # every node quantized, however badly
    images, labels = _colour_images()
    int8 = _export(_loud_channel_classifier(), images, labels, ["onnx-int8"], tmp_path, calibration=images)["onnx-int8"]
    assert int8.keras_accuracy == 1.0
    assert not int8.passed
    assert int8.accuracy_change < -0.3 and any(f.startswith("accuracy") for f in int8.failures)


def test_int8_keeps_the_nodes_that_quantize_worst_in_float_until_it_agrees(tmp_path):
    """The same model: int8 answers at chance on the calibration images, so the quantizer measures which nodes'
    outputs lose most, keeps those in float, quantizes again, and the file passes its gate; the manifest says how."""
    from transferkit.core.manifest import read_manifest

    images, labels = _colour_images()
    int8 = _export(_loud_channel_classifier(), images, labels, ["onnx-int8"], tmp_path, calibration=images)
    assert int8["onnx-int8"].passed and int8["onnx-int8"].accuracy == 1.0, int8["onnx-int8"].failures
    recipe = read_manifest(tmp_path / "bundle").formats["onnx-int8"].quantization
    assert recipe["calibration_agreement"] == 1.0 and recipe["activations"] == "uint8"
    assert any("/meet" in node for node in recipe["excluded_nodes"]), recipe  # where the ranges meet
    import onnx

    graph = onnx.load(str(tmp_path / "bundle" / "model.int8.onnx")).graph
    assert "QuantizeLinear" in {node.op_type for node in graph.node}  # still an int8 file, not a float copy


def test_validation_sample_is_stratified_across_classes(tmp_path):
    """With more images than the sample holds, every class is represented equally (not the first classes of a
    class-sorted list)."""
    from transferkit.export.bundle import stratified

    items = [(tmp_path / f"{c}_{i}.png", f"class{c:03d}") for c in range(100) for i in range(10)]
    chosen = stratified(items, 512)
    counts = {label: sum(1 for _, lab in chosen if lab == label) for label in {lab for _, lab in items}}
    assert len(chosen) == 512 and len(counts) == 100 and set(counts.values()) == {5, 6}
    assert stratified(items, 5000) and len(stratified(items, 5000)) == 1000
    assert stratified(items, 200, seed=0) != stratified(items, 200)  # calibration: shuffled within each class


def test_manifest_resize_rule_reproduces_the_decoder(tmp_path):
    """The resize rule is data a consumer outside transferkit can follow: here Pillow itself, step by step."""
    from PIL import Image

    from transferkit.export.bundle import resize_rule

    rule = resize_rule()
    assert (rule.filter, rule.mode, rule.jpeg_dct_downscale.factors) == ("bilinear", "squash", [1, 2, 4, 8])
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.jpg", quality=90)
    photo.save(tmp_path / "photo.png")
    size = 32
    for path in (tmp_path / "photo.png", tmp_path / "photo.jpg"):
        image = Image.open(path)
        if image.format == "JPEG":
            factor = max(f for f in rule.jpeg_dct_downscale.factors if f <= min(400 // size, 300 // size))
            assert factor == 8
            image.draft("RGB", (400 // factor, 300 // factor))  # makes Pillow pick exactly this factor
            assert image.size == (50, 38)
        expected = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        assert np.array_equal(decode_image(path, size), expected), path.name


def test_schema_1_bundles_stay_readable_and_newer_ones_are_refused(bundle, tmp_path):
    """A schema-1 manifest (float32 input, no resize rule) still loads, with float32 as the input dtype; a manifest
    from a newer transferkit is refused with a line that says so."""
    from transferkit.core.predictors import load_bundle

    copy = tmp_path / "old"
    shutil.copytree(bundle, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["schema_version"] = 1
    del raw["resize"]
    for entry in raw["formats"].values():
        del entry["input_dtype"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    manifest = load_bundle(copy).manifest
    assert manifest.schema_version == 1 and manifest.resize is None
    assert {entry.input_dtype for entry in manifest.formats.values()} == {"float32"}

    raw["schema_version"] = 5
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="schema version 5 was written by a newer transferkit"):
        load_bundle(copy)


def test_export_output_is_clean_and_the_log_file_keeps_everything(trained_run, tmp_path):
    """No TensorFlow/absl C++ log lines or retracing warnings on the terminal; --log-file keeps the details; the
    bundle is registered in the BentoML store under --name (the shared `bundle` fixture skips that step)."""
    import bentoml

    from transferkit.core.logs import is_native_log_line

    log = tmp_path / "export.log"
    result = run_cli("--log-file", str(log), "export", str(trained_run.run_dir), "--out", str(tmp_path / "b"),
                     "--formats", "onnx", "--name", "registered-by-export")
    assert result.returncode == 0, result.stderr[-2000:]
    version = read_manifest(tmp_path / "b").version
    assert f"registered-by-export:{version}" in result.stdout
    assert read_manifest(Path(bentoml.models.get(f"registered-by-export:{version}").path)).version == version
    lines = (result.stdout + result.stderr).splitlines()
    assert not [line for line in lines if is_native_log_line(line) or "retracing" in line]
    assert "| onnx |" in result.stdout and "validating onnx" in result.stdout
    assert "validating onnx" in log.read_text()
    assert is_native_log_line("E0000 00:00:1795624855.424809    9859 cuda_platform.cc:52] failed call to cuInit")
    assert not is_native_log_line("validating onnx on 90 images")
