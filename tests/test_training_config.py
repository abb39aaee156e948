"""The training configuration model and what is derived from it, without training: `transferkit train`'s options,
--config files, one-line errors for bad values, and the settings --resume compares."""

from __future__ import annotations

import argparse
import json

import pytest
from pydantic import BaseModel, ValidationError

from conftest import last_error_line, run_cli
from transferkit.core.errors import RunDirectoryError, UsageError
from transferkit.training.cli import SETTINGS, add_train_parser, config_from_args, flags_of, setting_field
from transferkit.training.config import (
    AugmentConfig,
    HeadConfig,
    TrainConfig,
    changed_settings,
    resume_invariant_fields,
)
from transferkit.training.rundir import RunConfig


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="transferkit")
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def setting_paths(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """Every leaf setting of the model, by dotted path."""
    paths = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            paths += setting_paths(field.annotation, f"{prefix}{name}.")
        else:
            paths.append(prefix + name)
    return paths


def resolved(config: TrainConfig, **changes) -> RunConfig:
    """A RunConfig as train() resolves one (without a dataset or TensorFlow)."""
    settings = {**config.to_dict(), "image_size": config.image_size or 224, "weights_resolved": config.weights,
                "early_stopping_start": config.resolved_early_stopping_start, "preprocessing": "tf",
                "family": "mobilenet_v2", "input": {"shape": [None, 224, 224, 3]}, "num_classes": 3}
    return RunConfig(**{**settings, **changes})


def test_defaults_and_what_the_model_resolves():
    config = TrainConfig(data="d", out="o")
    assert config.strategy == "fine-tune" and config.fine_tune_epochs == 5 and config.runs_phase2
    assert config.resolved_fine_tune_lr == pytest.approx(1e-4) and config.resolved_early_stopping_start == 0
    assert config.head == HeadConfig() and config.augment == AugmentConfig() and config.augment.active
    scratch = TrainConfig(data="d", out="o", weights="none", epochs=9)
    # Only fine-tuning has a phase 2, so config.json records none for the other strategies.
    assert scratch.strategy == "scratch" and scratch.fine_tune_epochs == 0 and not scratch.runs_phase2
    assert scratch.resolved_early_stopping_start == 3
    assert TrainConfig(data="runs/../d/", out="o").data == "runs/../d"  # as Path writes it, also for a Path
    dumped = config.to_dict()
    assert dumped["head"] == {"kind": "pool", "dropout": 0.2, "hidden_units": 0, "hidden_dropout": None, "l2": 0.0}
    assert list(dumped)[:4] == ["data", "out", "backbone", "image_size"] and dumped["augment"]["flip"] == "horizontal"


@pytest.mark.parametrize(("settings", "message"), [
    ({"epochs": 0}, "greater than or equal to 1"),
    ({"learning_rate": 0}, "greater than 0"),
    ({"label_smoothing": 1.0}, "less than 1"),
    ({"optimizer": "lion"}, "'adamw', 'adam', 'sgd', 'nadam' or 'rmsprop'"),
    ({"kfold": 1}, "must be 0 (off) or at least 2"),
    ({"head": {"dropout": 1.5}}, "less than 1"),
    ({"augment": {"flip": "diagonal"}}, "'horizontal', 'vertical'"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "split fractions must leave a training set"),
    ({"strategy": "scratch", "weights": "w.h5"}, "--strategy scratch trains from random weights"),
    ({"cache_features": True}, "--cache-features needs phase 1 without augmentation"),
    ({"cache_features": True, "weights": "none", "augment": {"enabled": False}}, "not apply to --strategy scratch"),
    ({"epocs": 3}, "Extra inputs are not permitted"),
])
def test_bad_settings_are_refused_by_the_model(settings, message):
    with pytest.raises(ValidationError) as caught:
        TrainConfig(data="d", out="o", **settings)
    assert message in str(caught.value)


def test_every_setting_is_an_option_derived_from_its_field():
    assert sorted(SETTINGS) == sorted(setting_paths()) and len(SETTINGS) == len(set(SETTINGS))
    for path in SETTINGS:
        assert setting_field(path).description, f"{path} has no description for its --help"
    # Nothing given: every value is the model's default (the options carry none of their own).
    assert config_from_args(parse("--data", "d", "--out", "o")) == TrainConfig(data="d", out="o")


def test_help_shows_the_models_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "--optimizer {adamw,adam,sgd,nadam,rmsprop}" in text and "--flip {horizontal,vertical," in text
    assert "--learning-rate LEARNING_RATE, --lr LEARNING_RATE" in text and "--augment, --no-augment" in text
    assert "phase-1 epochs (max; early stopping) (default: 10)" in text
    assert f"(default: {TrainConfig.model_fields['weight_decay'].default})" in text
    for flag in ("--head {pool,flatten}", "--dropout DROPOUT", "--no-restore-best", "--cache-features", "--kfold KFOLD",
                 "--force", "--resume", "--config CONFIG_JSON", "--list-backbones"):
        assert flag in text, flag


def test_flags_set_the_models_fields():
    config = config_from_args(parse(
        "--data", "d", "--out", "o", "--lr", "0.01", "--head", "flatten", "--dropout", "0.3", "--no-augment",
        "--flip", "none", "--no-restore-best", "--strategy", "feature-extraction", "--fine-tune-epochs", "3",
        "--kfold", "2", "--force"))
    assert config.learning_rate == 0.01 and config.head.kind == "flatten" and config.head.dropout == 0.3
    assert config.augment == AugmentConfig(enabled=False, flip="none") and config.restore_best is False
    assert config.strategy == "feature-extraction" and config.fine_tune_epochs == 0  # not a fine-tune run
    assert config.kfold == 2 and config.force is True and config.resume is False


def test_a_config_file_then_the_flags_given(tmp_path):
    kept = resolved(TrainConfig(data="d", out="runs/a", epochs=7, head=HeadConfig(dropout=0.1, l2=0.01), force=True,
                                augment=AugmentConfig(enabled=False)))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(kept.model_dump_json())
    config = config_from_args(parse("--config", str(tmp_path / "a"), "--out", "runs/b", "--l2", "0.02", "--augment"))
    expected = {**kept.model_dump(include=set(TrainConfig.model_fields)), "out": "runs/b", "force": False,
                "head": {**kept.head.model_dump(), "l2": 0.02},
                "augment": {**kept.augment.model_dump(), "enabled": True}}
    assert config.to_dict() == expected  # --force is per command: not taken from the file
    assert config.image_size == 224 and config.early_stopping_start == 0  # the run's resolved values are kept


def test_config_file_errors_are_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"data": "d", "out": "o", "epocs": 3, "seed": -1}))
    with pytest.raises(UsageError) as caught:
        config_from_args(parse("--config", str(path)))
    assert str(caught.value) == ("--seed: Input should be greater than or equal to 0 (got -1); epocs: Extra inputs "
                                 "are not permitted (got 3)")
    with pytest.raises(RunDirectoryError, match="expected a run's config.json"):
        config_from_args(parse("--config", str(tmp_path / "missing.json")))
    with pytest.raises(UsageError, match="train needs --data DIR and --out DIR"):
        config_from_args(parse("--out", "o"))


@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs", "0"], "--epochs: Input should be greater than or equal to 1 (got 0)"),
    (["--dropout", "1.5"], "--dropout: Input should be less than 1 (got 1.5)"),
    (["--cache-features"], "--cache-features needs phase 1 without augmentation: add --no-augment"),
])
def test_a_bad_value_on_the_command_line_is_one_line_and_exit_2(tmp_path, flags, message):
    result = run_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *flags)
    assert result.returncode == 2, result.stderr
    assert last_error_line(result) == f"transferkit train: error: {message}"
    assert "Traceback" not in result.stderr


def test_resume_compares_the_fields_marked_invariant_and_names_each_difference():
    assert set(resume_invariant_fields(RunConfig)) == {
        "data", "backbone", "image_size", "weights_resolved", "strategy", "alpha", "epochs", "fine_tune_epochs",
        "batch_size", "learning_rate", "fine_tune_lr", "optimizer", "weight_decay", "momentum", "schedule",
        "warmup_epochs", "label_smoothing", "class_weight", "unfreeze", "head", "augment", "val_fraction",
        "test_fraction", "seed", "cache_features", "mixed_precision", "calibrate"}
    kept = resolved(TrainConfig(data="d", out="o"))
    assert changed_settings(kept, resolved(TrainConfig(data="d", out="o2", patience=1, force=True, kfold=3))) == []
    changed = resolved(TrainConfig(data="d", out="o", seed=7, head=HeadConfig(dropout=0.5)), image_size=96)
    assert changed_settings(kept, changed) == ["image_size: kept 224, now 96", "head.dropout: kept 0.2, now 0.5",
                                               "seed: kept 42, now 7"]


def test_flag_names_of_nested_and_renamed_settings():
    assert flags_of("head.dropout") == ("--dropout",) and flags_of("fine_tune_epochs") == ("--fine-tune-epochs",)
    assert flags_of("head.kind") == ("--head",) and flags_of("learning_rate") == ("--learning-rate", "--lr")
