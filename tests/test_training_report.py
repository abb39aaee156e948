"""The fit diagnosis of training/report.py: a constructed history and evaluation for each verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from transferkit.training.data import Dataset, SplitData
from transferkit.training.report import diagnose


def _dataset(val_per_class: int, classes: int = 4) -> Dataset:
    def split(per_class: int) -> SplitData:
        labels = np.repeat(np.arange(classes), per_class)
        return SplitData([], labels, np.zeros((len(labels), 1, 1, 3), np.uint8))

    return Dataset(Path("/data"), [f"c{i}" for i in range(classes)],
                   {"train": split(40), "val": split(val_per_class), "test": split(val_per_class)}, False, 32)


def _history(val_losses: list[float], phase1_epochs: int | None = None) -> list[dict]:
    phase1 = len(val_losses) if phase1_epochs is None else phase1_epochs
    return [{"epoch": i + 1, "phase": 1 if i < phase1 else 2, "val_loss": v} for i, v in enumerate(val_losses)]


def _evaluations(train: float, val: float, test: float) -> dict:
    return {"train": {"accuracy": train}, "val": {"accuracy": val}, "test": {"accuracy": test}}


FALLING = [1.2, 0.8, 0.6, 0.5]


@pytest.mark.parametrize(("history", "evaluations", "val_per_class", "verdict", "phrase"), [
    (_history(FALLING), _evaluations(0.97, 0.94, 0.95), 10, "good fit", "generalizes"),
    (_history(FALLING), _evaluations(0.55, 0.52, 0.50), 10, "underfitting", "only 55.0%"),
    (_history(FALLING), _evaluations(0.99, 0.80, 0.81), 10, "overfitting", "by 19.0%"),
    # No accuracy gap, but the validation loss rose 40% after its minimum during fine-tuning.
    (_history([1.0, 0.5, 0.6, 0.7], phase1_epochs=2), _evaluations(0.95, 0.93, 0.92), 10, "overfitting",
     "rose from 0.500 to 0.700"),
    (_history(FALLING), _evaluations(0.95, 0.93, 0.92), 3, "unrepresentative validation split",
     "3 validation images"),
    (_history(FALLING), _evaluations(0.95, 0.95, 0.70), 10, "unrepresentative validation split", "differ by 25.0%"),
], ids=["good-fit", "underfitting", "overfitting-gap", "overfitting-rising-loss", "unrepresentative-small",
        "unrepresentative-val-test-gap"])
def test_each_verdict(history, evaluations, val_per_class, verdict, phrase):
    result = diagnose(history, evaluations, _dataset(val_per_class), phase1_epochs=2)
    assert result["verdict"] == verdict
    assert phrase in result["explanation"]
    assert result["numbers"]["chance_accuracy"] == 0.25


def test_rising_loss_within_phase_one_alone_is_not_overfitting():
    """Early stopping restored the best phase-1 epoch, so a late rise there is not held against the model."""
    result = diagnose(_history([1.0, 0.5, 0.7]), _evaluations(0.95, 0.93, 0.92), _dataset(10), phase1_epochs=3)
    assert result["verdict"] == "good fit"


def test_signals_are_ordered_most_actionable_first():
    result = diagnose(_history(FALLING), _evaluations(0.50, 0.45, 0.47), _dataset(2), phase1_epochs=4)
    assert [s["verdict"] for s in result["signals"]] == ["unrepresentative validation split", "underfitting"]
