"""Batched inference without ``model.predict()`` and the test metrics computed with scikit-learn."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def make_forward(model: keras.Model, input_shape: tuple[int, ...]):
    """A compiled inference function with a fixed signature (one trace, whatever the batch size)."""
    spec = tf.TensorSpec((None, *input_shape), tf.float32)

    @tf.function(input_signature=[spec], reduce_retracing=True)
    def forward(x):
        return model(x, training=False)

    return forward


def batched_forward(model: keras.Model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run ``model`` over uint8 or float images in batches; returns a float32 numpy array."""
    forward = make_forward(model, images.shape[1:])
    outputs = [
        forward(tf.convert_to_tensor(images[i : i + batch_size], tf.float32)).numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs).astype(np.float32)


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
