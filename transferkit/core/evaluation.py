"""``transferkit predict --evaluate``: metrics of a bundle on labelled folders (``CLASS/image.jpg``).

The true label of an image is the name of its parent folder. Metrics come from the same code as training's test
report (:func:`transferkit.core.metrics.classification_metrics`, :func:`transferkit.core.metrics.
confusion_matrix`), so a bundle evaluated on its run's test images reproduces the run's test accuracy. The
probabilities of every classified image are kept (``4 x classes`` bytes each) to compute top-5 and the loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transferkit.core.atomic import atomic_output_dir
from transferkit.core.batch import Outcome
from transferkit.core.errors import UsageError


def true_label(path: str) -> str:
    """The class an image is filed under: its parent folder's name."""
    return Path(path).parent.name


class Evaluation:
    """Collects (probabilities, true label) of classified images; images outside the bundle's classes are counted
    and left out of the metrics."""

    def __init__(self, class_names: list[str]):
        self.class_names = list(class_names)
        self._index = {name: i for i, name in enumerate(self.class_names)}
        self._probabilities: list[np.ndarray] = []
        self._labels: list[int] = []
        self.unknown: dict[str, int] = {}  # parent folder name -> images, for folders that are not a class

    def add(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            if outcome.probabilities is None:
                continue
            name = true_label(outcome.path)
            if name in self._index:
                self._probabilities.append(np.asarray(outcome.probabilities, np.float32))
                self._labels.append(self._index[name])
            else:
                self.unknown[name] = self.unknown.get(name, 0) + 1

    def metrics(self) -> tuple[dict, np.ndarray, np.ndarray]:
        from transferkit.core.metrics import classification_metrics

        if not self._labels:
            folders = ", ".join(sorted(self.unknown)[:5]) or "none"
            raise UsageError(f"--evaluate: no classified image sits in a folder named after one of the bundle's "
                             f"classes ({', '.join(self.class_names[:5])}...); parent folders found: {folders}")
        probabilities = np.stack(self._probabilities).astype(np.float64)
        labels = np.asarray(self._labels)
        return classification_metrics(probabilities, labels, self.class_names), probabilities, labels

    def write(self, report_dir: Path, force: bool, context: dict) -> dict:
        """Write ``metrics.json``, ``metrics.md``, ``confusion_matrix.png`` and ``reliability.png`` to
        ``report_dir`` (atomically)."""
        from transferkit.core.metrics import confusion_matrix, reliability_diagram

        metrics, probabilities, labels = self.metrics()
        metrics["left_out_not_a_class"] = self.unknown
        with atomic_output_dir(report_dir, force) as staging:
            (staging / "metrics.json").write_text(json.dumps({**context, **metrics}, indent=2) + "\n")
            (staging / "metrics.md").write_text(render_markdown(metrics, context))
            confusion_matrix(probabilities, labels, self.class_names, staging / "confusion_matrix.png")
            reliability_diagram({"bundle": probabilities}, labels, staging / "reliability.png",
                                f"Reliability ({len(labels)} images)")
        return metrics


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def render_markdown(metrics: dict, context: dict) -> str:
    lines = [f"# Evaluation of {context.get('bundle', 'the bundle')}", ""]
    lines += [f"- {key}: {value}" for key, value in context.items() if key != "bundle"]
    lines += [
        f"- images: {metrics['samples']}",
        f"- accuracy: {_percent(metrics['accuracy'])}",
        f"- top-5 accuracy: {_percent(metrics.get('top5_accuracy'))}"
        + ("" if "top5_accuracy" in metrics else " (5 classes or fewer: always 100 %)"),
        f"- macro F1: {metrics['macro_f1']:.4f}",
        f"- log loss: {metrics['loss']:.4f}",
        f"- expected calibration error (15 bins, top-1 confidence): {metrics['ece']:.4f}",
        f"- negative log-likelihood: {metrics['nll']:.4f}",
        "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | "
                     f"{row['support']} |")
    if metrics.get("left_out_not_a_class"):
        left = ", ".join(f"{k} ({v})" for k, v in metrics["left_out_not_a_class"].items())
        lines += ["", f"Left out (parent folder is not a class): {left}"]
    return "\n".join(lines) + "\n"
