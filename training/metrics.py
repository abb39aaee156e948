"""Classification metrics from probabilities (scikit-learn only, no TensorFlow): shared by training's test report
and by offline evaluation of a bundle (``transferkit predict --evaluate``)."""

from __future__ import annotations

import numpy as np


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
