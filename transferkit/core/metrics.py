"""Classification metrics and the confusion-matrix figure (scikit-learn and matplotlib, the ``reports`` extra; no
TensorFlow): shared by training's test report and by offline evaluation of a bundle (``transferkit predict
--evaluate``).

Figures are :class:`matplotlib.figure.Figure` objects rendered straight to a file by the Agg canvas: no pyplot state
and no backend switch, so a caller's matplotlib setup is left alone."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, top-5 (more than 5 classes: with 5 it is always 1), loss and per-class precision/recall/F1."""
    from sklearn.metrics import accuracy_score, classification_report, log_loss, top_k_accuracy_score

    classes = list(range(len(class_names)))
    predicted = probabilities.argmax(axis=1)
    report = classification_report(
        labels, predicted, labels=classes, target_names=class_names, output_dict=True, zero_division=0
    )
    metrics = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "loss": float(log_loss(labels, np.clip(probabilities, 1e-7, 1.0), labels=classes)),
        "samples": int(len(labels)),
        "per_class": {
            name: {
                "precision": float(report[name]["precision"]),
                "recall": float(report[name]["recall"]),
                "f1": float(report[name]["f1-score"]),
                "support": int(report[name]["support"]),
            }
            for name in class_names
        },
        "macro_f1": float(report["macro avg"]["f1-score"]),
    }
    if len(class_names) > 5:
        metrics["top5_accuracy"] = float(top_k_accuracy_score(labels, probabilities, k=5, labels=classes))
    return metrics


def figure(figsize: tuple[float, float]) -> Figure:
    """An empty figure attached to the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawing = Figure(figsize=figsize)
    FigureCanvasAgg(drawing)  # attaches itself: savefig renders PNG without pyplot
    return drawing


def confusion_matrix(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str], path: Path) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(5.0, 0.45 * len(class_names) + 2)
    fig = figure((size, size))
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(
        labels, probabilities.argmax(axis=1), labels=list(range(len(class_names))), display_labels=class_names,
        ax=ax, colorbar=False, include_values=len(class_names) <= 30, xticks_rotation="vertical",
    )
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
