"""``transferkit export MODEL.keras``: a Keras model transferkit did not train, bundled, validated and reloaded.

The models are tiny (one strided convolution, 32 px) and built here, so that the file runs in well under a minute;
what is checked is the wrapping (uint8 in, preprocessing and softmax inside), not the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import last_error_line, run_cli, run_cli_here
from transferkit.core.images import decode_image
from transferkit.core.manifest import MODEL_CARD_NAME, read_manifest

SIZE = 32


def _tiny_model(activation: str | None, input_size: int | None = SIZE, units: int = 10, seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_size, input_size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    # A large bias spread makes the logits model's rows sum far from 1 and its probabilities decisive.
    outputs = keras.layers.Dense(units, activation=activation,
                                 bias_initializer=keras.initializers.RandomNormal(stddev=2.0, seed=seed))(x)
    return keras.Model(inputs, outputs, name="tiny_net")


def _save(model, path: Path) -> Path:
    model.save(path)
    return path


def _images(data: Path, count: int = 40) -> np.ndarray:
    """uint8 pixels of ``count`` files of ``data``, from every class."""
    files = sorted(data.glob("*/*.png"))
    files = files[:: max(1, len(files) // count)][:count]
    return np.stack([decode_image(path, SIZE) for path in files])


@pytest.fixture(scope="module")
def probabilities_model(tmp_path_factory) -> Path:
    """A softmax model trained elsewhere on pixels scaled to [0, 1]."""
    return _save(_tiny_model("softmax"), tmp_path_factory.mktemp("models") / "scaled.keras")


@pytest.fixture(scope="module")
def exported(probabilities_model, digits_small, tmp_path_factory):
    """The real CLI, in a subprocess, registering in the test's BentoML store; labels from the folder names."""
    out = tmp_path_factory.mktemp("bundles") / "foreign"
    result = run_cli("export", str(probabilities_model), "--data", str(digits_small), "--preprocessing", "scale",
                     "--out", str(out), "--name", "foreign-test")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_a_keras_file_exports_with_the_same_gates_and_manifest(exported, digits_small):
    out, result = exported
    manifest = read_manifest(out)
    assert manifest.backbone == "custom" and manifest.family == "custom"
    assert manifest.class_names == sorted(p.name for p in digits_small.iterdir() if p.is_dir())
    assert manifest.image_size == SIZE and manifest.preprocessing["mode"] == "scale"
    assert set(manifest.formats) == {"savedmodel", "onnx", "onnx-fp16"}
    assert all(entry.input_dtype == "uint8" for entry in manifest.formats.values())
    assert manifest.validation.passed and manifest.validation.images == 300 and manifest.validation.source == "data"
    assert manifest.training["source"] == "keras_file" and manifest.training["outputs"] == "probabilities"
    assert manifest.training["model_name"] == "tiny_net"
    # Its head (global average pooling -> dense softmax) has an exact class activation map, found inside the model.
    assert manifest.explain.available and manifest.explain.resolution == [15, 15]
    assert all(row.cam_passed for row in manifest.validation.formats if row.format in manifest.formats)
    card = (out / MODEL_CARD_NAME).read_text()
    assert "not trained by transferkit" in card and "tiny_net" in card
    assert "BentoML tag" in result.stdout and "foreign-test:" in result.stdout
    assert "not trained by transferkit" in result.stdout


@pytest.mark.parametrize("backend", ["onnx", "savedmodel"])
def test_the_bundle_answers_like_the_keras_model(exported, probabilities_model, digits_small, backend):
    """The bundle takes uint8 pixels and scales them itself; the Keras model was given pixels / 255 by hand."""
    import keras

    from transferkit import load_bundle

    images = _images(digits_small)
    model = keras.models.load_model(probabilities_model, safe_mode=True)
    expected = np.asarray(model(images.astype(np.float32) / 255.0, training=False))
    answered = load_bundle(exported[0], backend=backend).probabilities(images)
    assert np.abs(answered - expected).max() <= 1e-4
    assert (answered.argmax(1) == expected.argmax(1)).all()


def test_the_registered_bundle_loads_by_its_tag(exported):
    from transferkit import load_bundle

    tag = next(line.split()[-1] for line in exported[1].stdout.splitlines() if "BentoML tag" in line)
    bundle = load_bundle(tag, backend="onnx")
    assert bundle.class_names == read_manifest(exported[0]).class_names


def test_logits_get_a_softmax(digits_small, tmp_path):
    import keras

    from transferkit import load_bundle
    from transferkit.export.foreign import ForeignModel, export_foreign

    path = _save(_tiny_model(None, seed=1), tmp_path / "logits.keras")
    result = export_foreign(ForeignModel(path=path, data=digits_small, preprocessing="MobileNetV2"),
                            tmp_path / "bundle", formats=["onnx"], register=False)
    assert result.manifest.training["outputs"] == "logits"
    assert result.manifest.preprocessing["mode"] == "tf"  # MobileNetV2's preprocess_input: x / 127.5 - 1
    images = _images(digits_small)
    logits = np.asarray(keras.models.load_model(path)(images.astype(np.float32) / 127.5 - 1.0), np.float64)
    assert not np.allclose(logits.sum(1), 1.0, atol=1e-2)
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    answered = load_bundle(tmp_path / "bundle", backend="onnx").probabilities(images)
    assert np.abs(answered.sum(1) - 1.0).max() <= 1e-5
    assert np.abs(answered - softmax).max() <= 1e-4

    refused = run_cli_here("export", str(path), "--data", str(digits_small), "--outputs", "probabilities",
                           "--out", str(tmp_path / "b2"))
    assert refused.returncode == 2, refused.stderr
    assert "not probabilities" in last_error_line(refused) and "--outputs logits" in last_error_line(refused)


def _one_line_error(*args: str) -> str:
    result = run_cli_here(*args)
    assert result.returncode == 2, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return last_error_line(result)


def test_label_count_mismatch_is_one_line(probabilities_model, digits_small, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([str(d) for d in range(11)]))
    line = _one_line_error("export", str(probabilities_model), "--data", str(digits_small), "--labels", str(labels),
                           "--out", str(tmp_path / "b"))
    assert "11 class names" in line and "10 outputs" in line
    eleven = _save(_tiny_model("softmax", units=11), tmp_path / "eleven.keras")
    line = _one_line_error("export", str(eleven), "--data", str(digits_small), "--out", str(tmp_path / "b"))
    assert "10 class names (the class folders of --data" in line and "11 outputs" in line
    labels.write_text(json.dumps([f"digit {d}" for d in range(10)]))
    line = _one_line_error("export", str(probabilities_model), "--data", str(digits_small), "--labels", str(labels),
                           "--out", str(tmp_path / "b"))
    assert "class folders that --labels" in line
    assert not (tmp_path / "b").exists()


def test_bad_model_files_and_flags_are_one_line(probabilities_model, digits_small, tmp_path):
    import keras

    out = str(tmp_path / "b")
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip file")
    assert "cannot be loaded as a Keras model" in _one_line_error("export", str(garbage), "--data",
                                                                  str(digits_small), "--out", out)
    inputs = keras.Input((SIZE, SIZE, 3))
    lam = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(keras.layers.Lambda(lambda x: x * 2.0)(inputs))))
    line = _one_line_error("export", str(_save(lam, tmp_path / "lambda.keras")), "--data", str(digits_small),
                           "--out", out)
    assert "safe_mode" in line
    any_size = _save(_tiny_model("softmax", input_size=None), tmp_path / "any.keras")
    assert "pass --image-size" in _one_line_error("export", str(any_size), "--data", str(digits_small), "--out", out)
    assert "--image-size 64" in _one_line_error("export", str(probabilities_model), "--data", str(digits_small),
                                                "--image-size", "64", "--out", out)
    assert "needs --data" in _one_line_error("export", str(probabilities_model), "--out", out)
    assert "--preprocessing 'bogus'" in _one_line_error("export", str(probabilities_model), "--data",
                                                        str(digits_small), "--preprocessing", "bogus", "--out", out)
    assert "for a Keras model file only" in _one_line_error("export", str(tmp_path), "--labels", "x.json",
                                                            "--out", out)
    assert "model file not found" in _one_line_error("export", str(tmp_path / "nope.keras"), "--data",
                                                     str(digits_small), "--out", out)
    assert not (tmp_path / "b").exists()


def test_a_legacy_h5_file_loads_too(tmp_path):
    from transferkit.export.foreign import is_model_file, load_keras_file, model_geometry

    path = _save(_tiny_model("softmax"), tmp_path / "net.h5")
    assert is_model_file(path) and not is_model_file(tmp_path)
    assert model_geometry(load_keras_file(path), None) == (SIZE, 10)


def test_help_explains_both_forms():
    result = run_cli_here("export", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "RUN_DIR | MODEL.keras" in text and "--preprocessing" in text and "--labels" in text
