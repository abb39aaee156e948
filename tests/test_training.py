"""Real training runs on the embedded digits: artifacts, re-evaluation, transfer, caching, k-fold, determinism, and
the process-wide switches a run must restore."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from conftest import run_cli, train_run
from transferkit.core.errors import OutputExistsError, UsageError
from transferkit.training.config import AugmentConfig
from transferkit.training.rundir import read_config, read_labels, read_metrics, split_files

ARTIFACTS = ["model.keras", "labels.json", "config.json", "split.json", "history.csv", "metrics.json",
             "learning_curves.png", "confusion_matrix.png", "reliability.png", "misclassified.png", "report.md",
             "checkpoints/best.weights.h5"]
NO_AUGMENT = AugmentConfig(enabled=False)


def run(tmp: Path, data: Path, name: str, **overrides):
    return train_run(tmp / name, data, **overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def fine_tuned(runs, digits_small):
    return run(runs, digits_small, "fine_tuned", strategy="fine-tune")


@pytest.fixture(scope="module")
def scratch(trained_run):
    return trained_run


def test_run_directory_has_every_artifact(fine_tuned):
    for name in ARTIFACTS:
        assert (fine_tuned.run_dir / name).is_file(), name
    for name in ("learning_curves.png", "confusion_matrix.png", "misclassified.png"):
        with Image.open(fine_tuned.run_dir / name) as image:
            assert image.format == "PNG" and image.size[0] > 300
    assert json.loads((fine_tuned.run_dir / "labels.json").read_text()) == [str(d) for d in range(10)]
    assert not list(fine_tuned.run_dir.parent.glob(".fine_tuned.partial*"))  # renamed into place, nothing left


def test_two_phases_are_recorded(fine_tuned):
    history = (fine_tuned.run_dir / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,phase,learning_rate")
    phases = [line.split(",")[1] for line in history[1:]]
    assert phases.count("1") >= 1 and phases.count("2") == 1
    rates = {line.split(",")[1]: float(line.split(",")[2]) for line in history[1:]}
    assert rates["2"] == pytest.approx(rates["1"] / 10)
    # cosine schedule with warm-up over each phase: the last phase-1 epoch ends at lr 0 (budget of 2 epochs)
    end_rates = [float(line.split(",")[3]) for line in history[1:]]
    assert end_rates[0] == pytest.approx(1e-3, rel=1e-3) and end_rates[1] == pytest.approx(0.0, abs=1e-9)
    config = read_config(fine_tuned.run_dir)
    assert config.backbone == "MobileNetV2" and config.preprocessing == "tf" and config.optimizer == "adamw"
    assert config.fine_tune_lr == pytest.approx(1e-4) and config.schedule == "cosine"


def test_metrics_and_report(fine_tuned):
    metrics = read_metrics(fine_tuned.run_dir)
    test = metrics.test
    assert test.top5_accuracy is not None and np.isfinite(test.loss) and metrics.failures == []
    assert set(test.per_class) == {str(d) for d in range(10)}
    assert sum(c.support for c in test.per_class.values()) == test.samples
    # A frozen random base (this run: --weights none with an explicit fine-tune strategy) cannot fit the digits.
    assert "underfitting" in [signal["verdict"] for signal in metrics.diagnosis["signals"]]
    report = (fine_tuned.run_dir / "report.md").read_text()
    assert f"**Diagnosis: {metrics.diagnosis['verdict']}.**" in report and "- **underfitting**" in report
    assert f"| test accuracy | {test.accuracy:.4f} |" in report and "## Per-class test metrics" in report


def test_saved_model_reproduces_test_accuracy_from_split_json(scratch):
    """Reload model.keras, decode split.json's test files from disk, and recompute the accuracy."""
    from transferkit.core.images import decode_image
    from transferkit.training.evaluate import batched_forward
    from transferkit.training.model import load_run_model

    labels = read_labels(scratch.run_dir)
    test_files = split_files(scratch.run_dir, "test")
    images = np.stack([decode_image(path, 32) for path, _ in test_files])
    truth = np.array([labels.index(label) for _, label in test_files])
    model = load_run_model(scratch.run_dir)
    accuracy = float((batched_forward(model, images).argmax(1) == truth).mean())
    metrics = read_metrics(scratch.run_dir)
    assert accuracy == pytest.approx(metrics.test.accuracy, abs=1e-9)
    assert len(test_files) == metrics.test.samples


def test_training_from_scratch_learns(scratch):
    """Three digit classes from random weights: far above chance (1/3) after a few epochs, and early stopping
    did not pick an epoch before BatchNormalization's statistics caught up."""
    metrics = scratch.metrics
    # Chance is 1/3. The same seeded run reached 0.97 on an AVX2 EPYC and 0.78 on an AMX Xeon (oneDNN's kernels
    # differ, and six epochs on ~380 images amplify it): 0.5 is far from both, and a model that learned nothing
    # exceeds it on ~80 test images with a probability of about 1e-3.
    assert metrics["test"]["accuracy"] > 0.5, metrics["test"]
    assert "top5_accuracy" not in metrics["test"]  # fewer than 5 classes
    config = read_config(scratch.run_dir)
    assert config.strategy == "scratch" and config.early_stopping_start == 2
    rows = list(csv.DictReader((scratch.run_dir / "history.csv").open()))
    best = min(rows[2:], key=lambda row: float(row["val_loss"]))  # the epoch early stopping restored
    assert metrics["val"]["accuracy"] == pytest.approx(float(best["val_accuracy"]), abs=1e-6)


def test_transfer_from_a_previous_run_copies_backbone_weights(scratch):
    from transferkit.core.backbones import get_backbone
    from transferkit.training.config import HeadConfig
    from transferkit.training.model import build_classifier, find_backbone_layer, load_run_model

    source = find_backbone_layer(load_run_model(scratch.run_dir))
    target = build_classifier(get_backbone("MobileNetV2"), 5, 32, str(scratch.run_dir), HeadConfig())
    for a, b in zip(find_backbone_layer(target).get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(UsageError, match="used backbone MobileNetV2, this one ResNet50"):
        build_classifier(get_backbone("ResNet50"), 5, 32, str(scratch.run_dir), HeadConfig())


def test_cache_features_with_kfold(runs, digits_small):
    result = run(runs, digits_small, "cached", strategy="feature-extraction", fine_tune_epochs=0,
                 augment=NO_AUGMENT, cache_features=True, kfold=2, epochs=3)
    assert result.metrics["timings"]["feature_extraction_seconds"] > 0
    assert result.metrics["epochs"]["phase2"] == 0
    kfold = result.metrics["kfold"]
    assert kfold["k"] == 2 and len(kfold["folds"]) == 2
    train_val = result.metrics["train"]["samples"] + result.metrics["val"]["samples"]
    # Every train+val image is held out exactly once; each fold early-stops on an inner split of its training part.
    assert sum(fold["held_out"] for fold in kfold["folds"]) == train_val
    for fold in kfold["folds"]:
        assert fold["train"] + fold["early_stopping"] + fold["held_out"] == train_val
        assert 0 < fold["early_stopping"] < fold["train"]
    assert "2-fold cross-validation" in (result.run_dir / "report.md").read_text()


def test_same_seed_same_result(runs, digits_small):
    first = run(runs, digits_small, "seed_a", strategy="feature-extraction", augment=NO_AUGMENT, fine_tune_epochs=0)
    second = run(runs, digits_small, "seed_b", strategy="feature-extraction", augment=NO_AUGMENT, fine_tune_epochs=0)
    assert first.metrics["test"]["loss"] == second.metrics["test"]["loss"]
    history_a = (first.run_dir / "history.csv").read_text()
    assert history_a == (second.run_dir / "history.csv").read_text()


def test_restore_best_picks_the_lowest_validation_loss_and_no_restore_best_keeps_the_last_epoch(runs, digits_small):
    # The same seeded run twice (head only, on cached features: seconds), differing only in restore_best. A high
    # constant learning rate makes the validation loss jump around: here the lowest is epoch 1's and the two runs
    # end one validation image apart. Where another CPU's best epoch is the last, both checks still hold.
    settings = dict(strategy="feature-extraction", augment=NO_AUGMENT, cache_features=True, epochs=5,
                    fine_tune_epochs=0, learning_rate=0.3, schedule="constant", patience=10, early_stopping_start=0)
    best = run(runs, digits_small, "restore_best", **settings)
    last = run(runs, digits_small, "keep_last", restore_best=False, **settings)
    with open(best.run_dir / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert (last.run_dir / "history.csv").read_text() == (best.run_dir / "history.csv").read_text()
    lowest = min(history, key=lambda row: float(row["val_loss"]))

    def val_correct(result, row=None) -> int:
        accuracy = float(row["val_accuracy"]) if row else result.metrics["val"]["accuracy"]
        return round(accuracy * result.metrics["val"]["samples"])

    assert val_correct(best) == val_correct(best, lowest)
    assert val_correct(last) == val_correct(last, history[-1])
    assert read_config(last.run_dir).restore_best is False and read_config(best.run_dir).restore_best is True
    assert "| restore_best | `False` |" in (last.run_dir / "report.md").read_text()


def test_configuration_errors_are_caught_before_work(runs, digits_small, fine_tuned):
    with pytest.raises(OutputExistsError, match="--force"):
        run(runs, digits_small, "fine_tuned")
    with pytest.raises(ValidationError, match="--no-augment"):  # the configuration model's own rule
        run(runs, digits_small, "x", cache_features=True)
    with pytest.raises(UsageError, match="at least 32 px"):
        run(runs, digits_small, "x", image_size=16)
    with pytest.raises(UsageError, match="--unfreeze 'nope'"):
        run(runs, digits_small, "x", unfreeze="nope", strategy="fine-tune")
    assert not (runs / "x").exists()


def test_config_reruns_a_run_with_the_options_given_overriding_it(runs, digits_small):
    """`transferkit train --config RUN/config.json` trains the same configuration again; options given override the
    file's (here the paths, relative to the working directory, a top-level and a nested setting), and the new
    config.json differs in exactly those."""
    first = run(runs, digits_small, "config_first", strategy="feature-extraction", augment=NO_AUGMENT,
                cache_features=True, epochs=1, patience=4)
    data = os.path.relpath(digits_small, runs)
    result = run_cli("train", "--config", str(first.run_dir / "config.json"), "--data", data, "--out", "config_second",
                     "--patience", "3", "--dropout", "0.3", cwd=runs)
    assert result.returncode == 0, result.stderr[-3000:]
    before = json.loads((first.run_dir / "config.json").read_text())
    after = json.loads((runs / "config_second" / "config.json").read_text())
    assert after == {**before, "data": data, "out": "config_second", "patience": 3,
                     "head": {**before["head"], "dropout": 0.3}}


def test_force_replaces_a_run_only_where_transferkit_wrote_one(runs, digits_small):
    """--force refuses a directory without transferkit's marker (a user's folder) and the dataset itself, keeping
    every file; it replaces a marked output in one step."""
    from transferkit.core.atomic import MARKER, mark_output

    target = runs / "replace_me"
    target.mkdir()
    (target / "precious.txt").write_text("the user's")
    settings = dict(force=True, strategy="feature-extraction", augment=NO_AUGMENT, cache_features=True, epochs=1,
                    fine_tune_epochs=0)
    with pytest.raises(OutputExistsError, match=f"transferkit did not write it \\(no {MARKER}"):
        run(runs, digits_small, "replace_me", **settings)
    with pytest.raises(OutputExistsError, match="an input of this command"):
        train_run(digits_small, digits_small, **settings)
    assert (target / "precious.txt").read_text() == "the user's" and len(list(digits_small.iterdir())) == 11
    mark_output(target)  # as an earlier run would have left it
    start = time.time()
    run(runs, digits_small, "replace_me", **settings)
    assert not (target / "precious.txt").exists() and (target / "model.keras").stat().st_mtime >= start - 1
    assert (target / MARKER).is_file() and not list(runs.glob(".replace_me*"))


def test_a_run_restores_the_process_wide_switches(scratch):
    """Op determinism and the mixed-precision policy are scoped to the run (the fixture ran in this process)."""
    import keras
    from tensorflow.python.framework import config as tf_config

    assert not tf_config.is_op_determinism_enabled()
    assert keras.mixed_precision.global_policy().name == "float32"


def test_importing_the_plots_keeps_the_matplotlib_backend():
    code = ("import matplotlib; import transferkit.training.plots, transferkit.training.train; "
            "print(matplotlib.get_backend())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MPLBACKEND": "svg"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "svg"
