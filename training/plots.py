"""The run's PNG plots: learning curves, confusion matrix, misclassified test images.

Figures are :class:`matplotlib.figure.Figure` objects rendered straight to a file by the Agg canvas: no pyplot
state and no backend switch, so importing or calling this module leaves a caller's matplotlib setup alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from transferkit.core.explain import normalized
from transferkit.core.metrics import confusion_matrix, figure
from transferkit.training.data import SplitData

__all__ = ["confusion_matrix", "learning_curves", "misclassified", "reliability"]


def learning_curves(history: list[dict], phase1_epochs: int, path: Path) -> None:
    """Train vs validation loss and accuracy per epoch, with the phase boundary marked."""
    epochs = [row["epoch"] for row in history]
    fig = figure((11, 4))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [r.get(metric) for r in history], "o-", label=f"train {metric}")
        ax.plot(epochs, [r.get(f"val_{metric}") for r in history], "s-", label=f"validation {metric}")
        if 0 < phase1_epochs < len(history):
            ax.axvline(phase1_epochs + 0.5, color="gray", linestyle="--", label="start of fine-tuning")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric.capitalize())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Learning curves (train metrics include dropout and augmentation)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _maps_of(model, images: np.ndarray) -> tuple[np.ndarray | None, str]:
    """The top class's activation maps of ``images`` (training/cam.py), or None and why the model has none."""
    from transferkit.training.cam import find_cam, keras_maps

    if model is None or len(images) == 0:
        return None, ""
    source, why = find_cam(model)
    if source is None:
        return None, why
    return keras_maps(source, np.asarray(images, np.float32))[1], ""


def misclassified(
    probabilities: np.ndarray, split: SplitData, class_names: list[str], path: Path, limit: int = 25, model=None
) -> None:
    """A grid of wrongly predicted test images, titled true -> predicted (confidence), most confident first; with
    ``model``, each overlaid with the class activation map of the predicted class (where the model looked)."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != split.labels)
    wrong_count = len(wrong)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:limit]
    maps, no_map = _maps_of(model, split.images[wrong])
    if len(wrong) == 0:
        fig = figure((5, 2))
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, f"No misclassified test images ({len(split)} of {len(split)} correct)",
                ha="center", va="center")
    else:
        cols = min(5, len(wrong))
        rows = math.ceil(len(wrong) / cols)
        fig = figure((2.6 * cols, 2.9 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for position, (ax, index) in enumerate(zip(axes.flat, wrong)):
            image = split.images[index]
            ax.imshow(image)
            if maps is not None:
                side = image.shape[0]
                ax.imshow(normalized(maps[position]), cmap="turbo", alpha=0.45, vmin=0, vmax=1,
                          interpolation="bilinear", extent=(-0.5, side - 0.5, side - 0.5, -0.5))
            ax.set_title(f"{class_names[split.labels[index]]} → {class_names[predicted[index]]}\n"
                         f"({probabilities[index, predicted[index]]:.0%})", fontsize=9)
        shown = ("; colour: where the model looked for the predicted class (class activation map)" if maps is not None
                 else f"; no class activation map: {no_map}" if no_map else "")
        fig.suptitle(f"Misclassified test images: {wrong_count} of "
                     f"{len(split)} (true → predicted){shown}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # leave room for the title
    fig.savefig(path, dpi=100)


def reliability(probabilities: dict, val_before: np.ndarray, test_before: np.ndarray, dataset, calibration: dict,
                path: Path) -> None:
    """Reliability diagrams of the validation and test splits: accuracy against mean top-1 confidence in 15
    equal-width bins, before and after temperature scaling (one curve when calibration was skipped)."""
    from transferkit.core.metrics import draw_reliability

    applied = bool(calibration.get("applied"))
    fig = figure((11, 5))
    axes = fig.subplots(1, 2)
    for ax, name, before in zip(axes, ("val", "test"), (val_before, test_before)):
        labels = dataset.splits[name].labels
        curves = {"before calibration": before}
        if applied:
            curves[f"after (T = {calibration['temperature']:.3f})"] = probabilities[name]
        split = "validation" if name == "val" else "test"
        draw_reliability(ax, curves, labels, f"Reliability ({split} split, {len(labels)} images)"
                         + ("" if applied else ": not calibrated"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
