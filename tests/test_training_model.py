"""The model and recipe without a full training run: standard-layer preprocessing, float32 rebuild of a
mixed-precision model, model.keras in a process without transferkit, the schedule, class weights, defaults."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from transferkit.core.backbones import registry
from transferkit.training.config import TrainConfig

FAMILIES = sorted({(row.family, row.preprocessing) for row in registry().values()})


@pytest.mark.parametrize(("family", "mode"), FAMILIES, ids=[f for f, _ in FAMILIES])
def test_preprocessing_block_matches_keras_preprocess_input(family, mode):
    from transferkit.training.layers import preprocessing_block

    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = np.asarray(importlib.import_module(f"keras.applications.{family}").preprocess_input(pixels.copy()))
    np.testing.assert_allclose(np.asarray(preprocessing_block(mode)(pixels)), expected, rtol=1e-5, atol=1e-4)


def test_mixed_precision_model_is_rebuilt_in_float32_with_the_same_weights():
    import keras

    from transferkit.core.backbones import get_backbone
    from transferkit.training.config import HeadConfig
    from transferkit.training.model import _all_layers, build_classifier, float32_inference_model

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = build_classifier(get_backbone("MobileNetV2"), 3, 32, "none", HeadConfig(), trainable_base=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert "float16" in {layer.dtype_policy.compute_dtype for layer in _all_layers(mixed)}
    rebuilt = float32_inference_model(mixed)
    assert {layer.dtype_policy.compute_dtype for layer in _all_layers(rebuilt)} == {"float32"}
    for a, b in zip(mixed.get_weights(), rebuilt.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    pixels = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    assert rebuilt(pixels).dtype == "float32"
    assert float32_inference_model(rebuilt) is rebuilt  # already float32: unchanged


def test_model_keras_loads_in_a_process_that_never_imported_transferkit(trained_run, tmp_path):
    from transferkit.core.images import decode_image
    from transferkit.training.evaluate import batched_forward
    from transferkit.training.model import load_run_model
    from transferkit.training.rundir import split_files

    images = np.stack([decode_image(path, 32) for path, _ in split_files(trained_run.run_dir)[:8]])
    np.save(tmp_path / "images.npy", images)
    code = (
        "import sys, json, numpy as np, keras\n"
        f"model = keras.models.load_model({str(trained_run.run_dir / 'model.keras')!r}, compile=False)\n"
        f"probabilities = np.asarray(model(np.load({str(tmp_path / 'images.npy')!r}).astype('float32')))\n"
        "print(json.dumps({'transferkit': sorted(m for m in sys.modules if m.startswith('transferkit')),\n"
        "                  'probabilities': probabilities.tolist()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["transferkit"] == []
    expected = batched_forward(load_run_model(trained_run.run_dir), images)
    np.testing.assert_allclose(np.asarray(answer["probabilities"]), expected, atol=1e-5)


def test_weights_none_without_a_strategy_trains_from_scratch():
    from transferkit.cli import build_parser
    from transferkit.training.cli import config_from_args

    assert TrainConfig(data="d", out="o", weights="none").strategy == "scratch"
    assert TrainConfig(data="d", out="o").strategy == "fine-tune"
    assert TrainConfig(data="d", out="o", weights="none", strategy="feature-extraction").strategy == \
        "feature-extraction"
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--weights", "none"])
    config = config_from_args(args)
    assert config.strategy == "scratch" and config.fine_tune_epochs == 0
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o"])
    assert config_from_args(args).strategy == "fine-tune" and config_from_args(args).restore_best is True
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--no-restore-best"])
    assert config_from_args(args).restore_best is False


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    from transferkit.training.recipe import learning_rate_schedule

    config = TrainConfig(data="d", out="o", warmup_epochs=1.0)
    schedule = learning_rate_schedule(config, 1e-3, epochs=4, steps_per_epoch=10)
    lr = [float(schedule(step)) for step in range(41)]
    assert lr[0] == 0.0 and lr[5] == pytest.approx(5e-4) and lr[10] == pytest.approx(1e-3)
    assert lr[25] == pytest.approx(5e-4, rel=1e-3)  # half-way through the 30 decay steps
    assert lr[40] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    constant = TrainConfig(data="d", out="o", schedule="constant")
    assert learning_rate_schedule(constant, 1e-3, 4, 10) == 1e-3


def test_the_learning_rate_is_traced_once_per_step_with_bitwise_the_same_updates():
    import keras

    from transferkit.training.recipe import optimizer

    calls = []

    class CountedSchedule(keras.optimizers.schedules.CosineDecay):
        def __call__(self, step):
            calls.append(step)
            return super().__call__(step)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = np.eye(4, dtype="float32")[np.arange(32) % 4]
    config = TrainConfig(data="d", out="o", optimizer="adamw", weight_decay=1e-2)

    def train(once_per_step: bool) -> tuple[list[np.ndarray], int, str]:
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3), keras.layers.BatchNormalization(),
                                  keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(4, activation="softmax")])
        schedule = CountedSchedule(0.0, 12, warmup_target=1e-2, warmup_steps=4)
        opt = optimizer(config, schedule) if once_per_step else keras.optimizers.AdamW(schedule, weight_decay=1e-2)
        model.compile(optimizer=opt, loss="categorical_crossentropy")
        opt.build(model.trainable_variables)  # as the recipe does, so the step is traced once
        calls.clear()
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)  # traced once, then 7 more steps
        return model.get_weights(), len(calls), keras.saving.serialize_keras_object(opt)["class_name"]

    keras_weights, keras_calls, _ = train(once_per_step=False)
    weights, traced_calls, class_name = train(once_per_step=True)
    variables = 6  # conv kernel + bias, BatchNormalization gamma + beta, dense kernel + bias: each decayed
    assert (keras_calls, traced_calls) == (variables + 1, 1)
    assert all(np.array_equal(a, b) for a, b in zip(keras_weights, weights))
    assert class_name == "AdamW"  # model.keras still names Keras's own optimizer


def test_balanced_class_weights():
    from transferkit.training.recipe import class_weights

    labels = np.array([0] * 60 + [1] * 20 + [2] * 20)
    weights = class_weights(TrainConfig(data="d", out="o", class_weight="balanced"), labels, 3)
    assert weights == pytest.approx({0: 100 / 180, 1: 100 / 60, 2: 100 / 60})
    assert class_weights(TrainConfig(data="d", out="o"), labels, 3) is None
