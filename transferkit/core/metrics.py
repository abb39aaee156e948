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
        "ece": expected_calibration_error(probabilities, labels),
        "nll": negative_log_likelihood(probabilities, labels),
    }
    if len(class_names) > 5:
        metrics["top5_accuracy"] = float(top_k_accuracy_score(labels, probabilities, k=5, labels=classes))
    return metrics


ECE_BINS = 15
NLL_FLOOR = 1e-12  # a probability of 0 for the true class counts as -log(1e-12), not infinity


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class) (numpy only; the probabilities as given, floored at :data:`NLL_FLOOR`)."""
    p = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return float("nan")
    true = p[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(true, NLL_FLOOR))))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """The top-1 confidence in ``bins`` equal-width bins over [0, 1] (bin i holds (i/bins, (i+1)/bins], the first
    also 0): per bin the image count, mean confidence and accuracy (None where empty)."""
    p = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, np.int64)
    confidence = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == labels) if len(p) else np.zeros(0, bool)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    rows = []
    for i in range(bins):
        member = index == i
        count = int(member.sum())
        rows.append({"lower": i / bins, "upper": (i + 1) / bins, "count": count,
                     "confidence": float(confidence[member].mean()) if count else None,
                     "accuracy": float(correct[member].mean()) if count else None})
    return rows


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-width bins of the top-1 confidence of (images in bin / images) * |accuracy - mean
    confidence| (Guo et al. 2017, 15 bins). Numpy only."""
    n = len(labels)
    if n == 0:
        return float("nan")
    return float(sum(row["count"] / n * abs(row["accuracy"] - row["confidence"])
                     for row in reliability_bins(probabilities, labels, bins) if row["count"]))


def reliability_diagram(curves: dict[str, np.ndarray], labels: np.ndarray, path: Path, title: str,
                        bins: int = ECE_BINS) -> None:
    """Accuracy against mean top-1 confidence per bin, one line per entry of ``curves`` (e.g. before and after
    calibration), with the diagonal of perfect calibration and the ECE of each in the legend."""
    fig = figure((5.5, 5.5))
    draw_reliability(fig.subplots(), curves, labels, title, bins)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def draw_reliability(ax, curves: dict[str, np.ndarray], labels: np.ndarray, title: str, bins: int = ECE_BINS) -> None:
    """One reliability diagram on ``ax`` (matplotlib axes): the diagonal, and a line per entry of ``curves``."""
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfectly calibrated")
    for (name, probabilities), marker in zip(curves.items(), "os^v"):
        if not len(labels):
            continue
        rows = [row for row in reliability_bins(probabilities, labels, bins) if row["count"]]
        ece = expected_calibration_error(probabilities, labels, bins)
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker=marker, linestyle="-",
                label=f"{name}: ECE {ece:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"mean top-1 confidence ({bins} equal-width bins)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")


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
