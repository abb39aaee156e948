"""Fit diagnosis and the run's ``report.md``.

The diagnosis compares the final model's accuracy on the training split (measured in inference mode, so without
dropout or augmentation, like validation and test) with validation and test, and reads the validation-loss curve.
"""

from __future__ import annotations

from typing import Any

from transferkit.training.data import Dataset

# Thresholds, in accuracy points, chosen to flag what a person would want to look at, not to be subtle.
UNDERFIT_TRAIN_ACCURACY = 0.80
OVERFIT_GAP = 0.10
UNREPRESENTATIVE_GAP = 0.15
MIN_VAL_PER_CLASS = 5
VAL_LOSS_RISE = 0.20


def diagnose(history: list[dict], evaluations: dict[str, dict], dataset: Dataset, phase1_epochs: int) -> dict:
    """Classify the fit as underfitting / overfitting / good fit / unrepresentative validation split."""
    train_acc = evaluations["train"]["accuracy"]
    val_acc = evaluations["val"]["accuracy"]
    test_acc = evaluations["test"]["accuracy"]
    val_losses = [row["val_loss"] for row in history]
    min_val_loss = min(val_losses)
    final_val_loss = val_losses[-1]
    val_per_class = min(dataset.counts()["val"].values(), default=0)
    numbers = {
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "train_val_gap": train_acc - val_acc,
        "val_test_gap": val_acc - test_acc,
        "min_val_loss": min_val_loss,
        "final_val_loss": final_val_loss,
        "smallest_val_class": val_per_class,
        "chance_accuracy": 1 / len(dataset.class_names),
    }
    signals = []
    if val_per_class < MIN_VAL_PER_CLASS or abs(val_acc - test_acc) > UNREPRESENTATIVE_GAP:
        signals.append(("unrepresentative validation split",
                        f"the smallest class has {val_per_class} validation images and validation vs test "
                        f"accuracy differ by {abs(val_acc - test_acc):.1%}: model selection rests on noise. "
                        "Use a larger validation fraction or --kfold."))
    if train_acc < UNDERFIT_TRAIN_ACCURACY:
        signals.append(("underfitting",
                        f"the model reaches only {train_acc:.1%} on its own training images. Train longer, unfreeze "
                        "more layers, raise the learning rate, use a larger backbone or input size, or regularize "
                        "less."))
    rising = final_val_loss > min_val_loss * (1 + VAL_LOSS_RISE) and len(history) > phase1_epochs
    if train_acc - val_acc > OVERFIT_GAP or rising:
        signals.append(("overfitting",
                        f"training accuracy exceeds validation accuracy by {train_acc - val_acc:.1%}"
                        + (f" and the validation loss rose from {min_val_loss:.3f} to {final_val_loss:.3f}"
                           if rising else "")
                        + ". Add augmentation or dropout, unfreeze fewer layers, lower the fine-tuning learning "
                          "rate, or add data."))
    if not signals:
        signals.append(("good fit",
                        f"training {train_acc:.1%}, validation {val_acc:.1%}, test {test_acc:.1%}: the model fits "
                        "its data and generalizes to held-out images."))
    # The most actionable diagnosis first: a noisy validation split undermines every other reading.
    order = ["unrepresentative validation split", "underfitting", "overfitting", "good fit"]
    signals.sort(key=lambda s: order.index(s[0]))
    return {"verdict": signals[0][0], "explanation": signals[0][1],
            "signals": [{"verdict": v, "explanation": e} for v, e in signals], "numbers": numbers}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render(config: dict, metrics: dict, dataset: Dataset, fit: Any) -> str:
    """The human-readable run report (Markdown)."""
    diagnosis = metrics["diagnosis"]
    lines = [
        f"# Training report: {config['backbone']} on {dataset.root.name}",
        "",
        f"**Diagnosis: {diagnosis['verdict']}.** {diagnosis['explanation']}",
        *_result(metrics),
        *_calibration(metrics.get("calibration")),
        *_diagnosis(metrics),
        *_per_class(metrics["test"]),
        *_data(config, metrics, dataset),
        *_kfold(metrics),
        *_configuration(config),
        *_timings(metrics["timings"]),
        *_files(config),
    ]
    return "\n".join(lines)


def _result(metrics: dict) -> list[str]:
    test = metrics["test"]
    lines = ["", "## Result", "", "| metric | value |", "|---|---|", f"| test accuracy | {test['accuracy']:.4f} |"]
    if "top5_accuracy" in test:
        lines.append(f"| test top-5 accuracy | {test['top5_accuracy']:.4f} |")
    lines += [
        f"| test loss | {test['loss']:.4f} |",
        f"| test macro F1 | {test['macro_f1']:.4f} |",
        f"| validation accuracy | {metrics['val']['accuracy']:.4f} |",
        f"| training accuracy (inference mode) | {metrics['train']['accuracy']:.4f} |",
        f"| epochs (phase 1 + phase 2) | {metrics['epochs']['phase1']} + {metrics['epochs']['phase2']} |",
    ]
    if "kfold" in metrics:
        summary = metrics["kfold"]["summary"]
        lines.append(f"| {metrics['kfold']['k']}-fold accuracy | {summary['accuracy']['mean']:.4f} ± "
                     f"{summary['accuracy']['std']:.4f} |")
    return lines


def calibration_lines(calibration: dict | None) -> list[str]:
    """The calibration section (shared with the bundle's model card): T, or why none, and ECE/NLL before/after."""
    if not calibration:
        return []
    lines = ["", "## Calibration", ""]
    if calibration.get("applied"):
        lines.append(f"Temperature scaling: T = {calibration['temperature']:.4f}, fitted on the validation split by "
                     "minimising the negative log-likelihood and folded into the saved model's final layer, so "
                     "`model.keras` and every exported format output the calibrated probabilities. The top-1 class "
                     "is unchanged" + ("." if calibration.get("argmax_unchanged", True) else " (NOT: check).")
                     + " See `reliability.png`.")
    else:
        lines.append(f"Not calibrated: {calibration.get('reason')}.")
    table = calibration_table(calibration)
    if table:
        lines += table + ["", f"ECE: expected calibration error over {calibration.get('bins', 15)} equal-width bins "
                          "of the top-1 confidence; NLL: mean -log p(true class)."]
    return lines


def calibration_table(calibration: dict) -> list[str]:
    """ECE and NLL before and after calibration on each split that has them (the report's and the model card's)."""
    rows = [(name, calibration.get(name)) for name in ("val", "test") if calibration.get(name)]
    if not rows:
        return []
    return ["", "| split | images | ECE before | ECE after | NLL before | NLL after |", "|---|---|---|---|---|---|"] + [
        f"| {'validation' if name == 'val' else name} | {row['samples']} | {row['before']['ece']:.4f} | "
        f"{row['after']['ece']:.4f} | {row['before']['nll']:.4f} | {row['after']['nll']:.4f} |" for name, row in rows]


def _calibration(calibration: dict | None) -> list[str]:
    return calibration_lines(calibration)


def _diagnosis(metrics: dict) -> list[str]:
    """The diagnosis signals and numbers, then the notes and failed steps."""
    diagnosis = metrics["diagnosis"]
    lines = ["", "## Diagnosis signals", ""]
    lines += [f"- **{s['verdict']}**: {s['explanation']}" for s in diagnosis["signals"]]
    lines += ["", "Numbers behind it:", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in diagnosis["numbers"].items()]
    for note in metrics.get("notes", []):
        lines += ["", f"Note: {note}."]
    for failure in metrics.get("failures", []):
        lines += ["", f"**Failed step: {failure['step']}** ({failure['error']}); the run is complete without it."]
    return lines


def _per_class(test: dict) -> list[str]:
    lines = ["", "## Per-class test metrics", "", "| class | precision | recall | F1 | support |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
              for name, m in test["per_class"].items()]
    return lines


def _data(config: dict, metrics: dict, dataset: Dataset) -> list[str]:
    counts = metrics["data"]["counts"]
    lines = ["", "## Data", "", f"Root: `{dataset.root}` ({'pre-split' if dataset.presplit else 'split here'}, "
             f"seed {config['seed']}; every file's split is in `split.json`).", "",
             "| class | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
    lines += [f"| {name} | " + " | ".join(str(counts[s].get(name, 0)) for s in counts) + " |"
              for name in dataset.class_names]
    skipped = metrics["data"]["skipped"]
    lines += ["", f"Skipped {len(skipped)} unreadable file(s)" + (":" if skipped else ".")]
    lines += [f"- `{item['file']}`: {item['reason']}" for item in skipped]
    if metrics["data"]["ignored_non_image_files"]:
        lines.append(f"Ignored {metrics['data']['ignored_non_image_files']} file(s) without an image extension.")
    return lines


def _kfold(metrics: dict) -> list[str]:
    if "kfold" not in metrics:
        return []
    lines = ["", f"## {metrics['kfold']['k']}-fold cross-validation (train + val; test held out)", "",
             "| fold | accuracy | loss | macro F1 | epochs |", "|---|---|---|---|---|"]
    lines += [f"| {r['fold']} | {r['accuracy']:.4f} | {r['loss']:.4f} | {r['macro_f1']:.4f} | {r['epochs']} |"
              for r in metrics["kfold"]["folds"]]
    return lines


REPORTED_SETTINGS = ("backbone", "image_size", "weights", "strategy", "optimizer", "weight_decay", "learning_rate",
                     "fine_tune_lr", "schedule", "warmup_epochs", "label_smoothing", "class_weight", "unfreeze",
                     "batch_size", "epochs", "fine_tune_epochs", "patience", "early_stopping_start", "restore_best",
                     "head", "augment")


def _configuration(config: dict) -> list[str]:
    lines = ["", "## Configuration", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | `{config.get(key)}` |" for key in REPORTED_SETTINGS]
    return lines


def _timings(timings: dict[str, float]) -> list[str]:
    lines = ["", "## Timings", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k.replace('_seconds', '').replace('_', ' ')} | {v:.1f} |" for k, v in timings.items()]
    return lines


def _files(config: dict) -> list[str]:
    final = "best epoch by validation loss" if config.get("restore_best", True) else "each phase's last epoch"
    return ["", "## Files", "",
            "- `model.keras`: the inference-ready float32 model (takes RGB 0-255; preprocessing inside, built "
            "from standard Keras layers). Load it with `keras.models.load_model`.",
            "- `labels.json`, `config.json`, `split.json`, `history.csv`, `metrics.json`",
            "- `learning_curves.png`, `confusion_matrix.png`, `reliability.png`, `misclassified.png`",
            f"- `checkpoints/best.weights.h5`: the final weights ({final}); "
            "`checkpoints/phase1.weights.h5`: the weights after phase 1", ""]
