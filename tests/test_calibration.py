"""Issue 28, items 1 and 5: temperature scaling folded into the saved model and every exported format, ECE/NLL
before and after in the run's records, and the bundle's model card and ONNX class-name metadata."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_cli_here, train_run
from transferkit.core.metrics import (
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from transferkit.training.calibration import MIN_VALIDATION_IMAGES, apply_temperature, fit_temperature, skip_reason


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fitted_temperature_recovers_a_known_one(true_t):
    """Labels drawn from softmax(z) (calibrated); the model reports softmax(T z), which softmax(log p / T) undoes:
    the fit finds T within 5 %."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, size=(6000, 5))
    calibrated = _softmax(logits)
    labels = np.array([rng.choice(5, p=p) for p in calibrated])
    reported = _softmax(logits * true_t)  # true_t > 1: over-confident; < 1: under-confident
    fitted = fit_temperature(reported, labels)
    assert abs(fitted - true_t) / true_t < 0.05, fitted
    # Scaling never changes the top-1 class, and it lowers the NLL.
    after = apply_temperature(reported, fitted)
    assert np.array_equal(after.argmax(axis=1), reported.argmax(axis=1))
    assert negative_log_likelihood(after, labels) < negative_log_likelihood(reported, labels)
    assert np.allclose(after, calibrated, atol=0.02)


def test_ece_and_nll_equal_hand_computed_values():
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.4, 0.6], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 0])
    # Bins of width 1/15: the two 0.95s share (14/15, 1], accuracy 1/2; 0.6 is alone and right; 0.7 alone and wrong.
    expected = 2 / 4 * abs(0.5 - 0.95) + 1 / 4 * abs(1 - 0.6) + 1 / 4 * abs(0 - 0.7)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.5)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)
    assert negative_log_likelihood(probabilities, labels) == pytest.approx(
        -(math.log(0.95) + math.log(0.05) + math.log(0.6) + math.log(0.3)) / 4)
    bins = reliability_bins(probabilities, labels)
    assert len(bins) == 15 and sum(row["count"] for row in bins) == 4 and bins[14]["count"] == 2
    # A perfectly calibrated case: confidence 0.75 and 3 of 4 right.
    assert expected_calibration_error(np.tile([0.75, 0.25], (4, 1)), np.array([0, 0, 0, 1])) == pytest.approx(0)
    metrics = classification_metrics(probabilities, labels, ["a", "b"])  # what predict --evaluate reports
    assert metrics["ece"] == pytest.approx(0.5) and metrics["nll"] == pytest.approx(
        negative_log_likelihood(probabilities, labels))


def test_skip_reasons():
    assert "--no-calibrate" in skip_reason(None, 100, enabled=False)
    assert f"fewer than {MIN_VALIDATION_IMAGES}" in skip_reason(None, MIN_VALIDATION_IMAGES - 1, enabled=True)


def test_train_help_offers_no_calibrate():
    result = run_cli_here("train", "--help")
    assert "--calibrate, --no-calibrate" in result.stdout


def test_a_run_records_calibration_and_keeps_the_argmax(trained_run):
    """metrics.json, report.md and reliability.png; the saved model is the trained one with T folded in: its
    probabilities are softmax(log p / T) of the uncalibrated weights' (checkpoints/best.weights.h5), same argmax."""
    import keras

    from transferkit.core.images import decode_image
    from transferkit.training.evaluate import batched_forward
    from transferkit.training.rundir import read_metrics, split_files

    run = trained_run.run_dir
    calibration = read_metrics(run).calibration
    assert calibration.applied and calibration.reason is None and calibration.argmax_unchanged
    assert 0.05 < calibration.temperature < 20
    for split in (calibration.val, calibration.test):
        assert split.samples > 0
        for scores in (split.before, split.after):
            assert 0 <= scores.ece <= 1 and scores.nll > 0
    # T minimises the validation NLL, so it cannot be worse there than T = 1.
    assert calibration.val.after.nll <= calibration.val.before.nll + 1e-6
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["ece"] == pytest.approx(calibration.test.after.ece)
    report = (run / "report.md").read_text()
    assert "## Calibration" in report and f"T = {calibration.temperature:.4f}" in report
    assert (run / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    files = split_files(run, "test")
    images = np.stack([decode_image(path, 32) for path, _ in files]).astype(np.float32)
    calibrated_model = keras.models.load_model(run / "model.keras", compile=False, safe_mode=True)
    after = batched_forward(calibrated_model, images)
    raw_model = keras.models.load_model(run / "model.keras", compile=False, safe_mode=True)
    raw_model.load_weights(run / "checkpoints" / "best.weights.h5")
    before = batched_forward(raw_model, images)
    assert np.array_equal(after.argmax(axis=1), before.argmax(axis=1))  # accuracy unchanged
    assert np.allclose(apply_temperature(before, calibration.temperature), after, atol=1e-5)
    assert not np.allclose(before, after, atol=1e-4) or abs(calibration.temperature - 1) < 1e-3


def test_model_keras_loads_in_a_fresh_process_in_safe_mode(trained_run):
    code = ("import sys, keras; m = keras.models.load_model(sys.argv[1], compile=False, safe_mode=True); "
            "print(m.output.shape)")
    result = subprocess.run([sys.executable, "-c", code, str(trained_run.run_dir / "model.keras")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_small_validation_split_skips_calibration_with_a_reason(tmp_path, digits_small):
    result = train_run(tmp_path / "run", digits_small, epochs=1, fine_tune_epochs=0, val_fraction=0.05)
    calibration = result.metrics["calibration"]
    assert not calibration["applied"] and calibration.get("temperature") is None
    assert f"fewer than {MIN_VALIDATION_IMAGES}" in calibration["reason"]
    assert calibration["val"]["before"] == calibration["val"]["after"]
    assert "Not calibrated:" in (tmp_path / "run" / "report.md").read_text()


def test_the_bundle_records_the_temperature_and_its_gates_compare_calibrated_outputs(bundle, trained_run):
    """The gates compare every format with model.keras, which holds T: passing them means the formats output the
    calibrated probabilities."""
    from transferkit.core.manifest import read_manifest

    manifest = read_manifest(bundle)
    temperature = trained_run.metrics["calibration"]["temperature"]
    assert manifest.validation.passed and not manifest.validation_overridden
    assert manifest.calibration["applied"] and manifest.calibration["temperature"] == pytest.approx(temperature)
    assert manifest.training["calibration"]["temperature"] == pytest.approx(temperature)
    assert "calibrated" in manifest.output["meaning"]
    assert manifest.training["test"]["ece"] == pytest.approx(trained_run.metrics["test"]["ece"])


def test_the_bundle_has_a_listed_model_card(bundle, tmp_path):
    from transferkit.core.errors import BundleError
    from transferkit.core.manifest import read_manifest, verify_bundle

    manifest = read_manifest(bundle)
    card = bundle / "MODEL_CARD.md"
    entry = manifest.documents["model_card"]
    assert entry.file == "MODEL_CARD.md" and entry.bytes == card.stat().st_size
    assert entry.sha256 == hashlib.sha256(card.read_bytes()).hexdigest()
    text = card.read_text()
    for name in manifest.class_names:
        assert f"`{name}`" in text
    for heading in ("## Training data", "## Metrics", "## Calibration", "## Validation of the exported formats",
                    "## Intended use and limits"):
        assert heading in text
    assert "Not evaluated outside its data" in text and "| onnx-fp16 |" in text and "ECE before" in text
    verify_bundle(bundle, manifest)

    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    (copy / "MODEL_CARD.md").write_text(text + "\nedited\n")
    with pytest.raises(BundleError, match="MODEL_CARD.md does not match its manifest checksum"):
        verify_bundle(copy, read_manifest(copy))


def test_a_schema_2_bundle_without_card_or_calibration_still_loads(bundle, tmp_path):
    from transferkit.core.predictors import load_bundle

    copy = tmp_path / "schema2"
    shutil.copytree(bundle, copy)
    (copy / "MODEL_CARD.md").unlink()
    raw = json.loads((copy / "manifest.json").read_text())
    raw["schema_version"] = 2
    del raw["documents"], raw["calibration"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    manifest = load_bundle(copy).manifest
    assert manifest.documents == {} and manifest.calibration is None


def test_onnx_files_carry_the_class_names(bundle):
    import onnxruntime as ort

    from transferkit.core.manifest import read_manifest

    manifest = read_manifest(bundle)
    onnx_formats = [name for name in manifest.formats if name.startswith("onnx")]
    assert onnx_formats
    for name in onnx_formats:
        session = ort.InferenceSession(str(bundle / manifest.formats[name].file), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        assert json.loads(meta["class_names"]) == manifest.class_names, name


def test_a_temperature_at_the_end_of_the_search_is_not_used():
    """Every validation image right with a margin: the NLL falls towards 0 as T -> 0, the fit ends at the range's
    end, and calibration is skipped with that reason instead of making every answer near-certain."""
    from transferkit.training.calibration import LOG_T_RANGE, boundary_reason

    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]] * 10)
    labels = np.array([0, 1, 2] * 10)
    fitted = fit_temperature(probabilities, labels)
    assert fitted == pytest.approx(math.exp(LOG_T_RANGE[0]), rel=1e-2)
    assert "no minimum" in boundary_reason(fitted)
    assert boundary_reason(1.3) is None
