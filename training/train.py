"""One training run: data -> phase 1 (frozen base) -> phase 2 (fine-tune) -> evaluation -> run directory.

:func:`train` is the library entry point behind ``transferkit train``; everything it writes lands atomically in
``config.out``. The recipe follows the keras.io transfer-learning guide.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.core.atomic import atomic_output_dir, check_output_dir
from transferkit.core.backbones import Backbone, get_backbone
from transferkit.core.errors import UsageError
from transferkit.core.system import library_versions
from transferkit.training.config import TrainConfig
from transferkit.training.data import Dataset, SplitData, check_data_dir, load_dataset

Log = Callable[[str], None]


@dataclass
class FitResult:
    model: object  # keras.Model
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    phase1_epochs: int = 0
    phase2_epochs: int = 0
    trainable_layers_phase2: int = 0


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    config: dict


def validate_config(config: TrainConfig) -> tuple[Backbone, int, str, list[str]]:
    """Check everything checkable before any data is read. Returns (backbone, size, weights, warnings)."""
    backbone = get_backbone(config.backbone)
    size = config.image_size or backbone.default_size
    check_data_dir(Path(config.data))
    weights = config.weights
    if config.strategy == "scratch":
        if weights not in ("imagenet", "none"):
            raise UsageError("--strategy scratch trains from random weights; drop --weights")
        weights = "none"
    elif weights not in ("imagenet", "none") and not Path(weights).exists():
        raise UsageError(f"--weights must be imagenet, none, a weights file or a run directory; {weights} not found")
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.fine_tune_epochs < 0:
        raise UsageError(f"--fine-tune-epochs must be >= 0, got {config.fine_tune_epochs}")
    if config.learning_rate <= 0 or (config.fine_tune_lr is not None and config.fine_tune_lr <= 0):
        raise UsageError("learning rates must be positive")
    if config.cache_features and config.augment.active:
        raise UsageError("--cache-features needs phase 1 without augmentation: add --no-augment")
    if config.cache_features and config.strategy == "scratch":
        raise UsageError("--cache-features needs a frozen base; it does not apply to --strategy scratch")
    if config.kfold == 1 or config.kfold < 0:
        raise UsageError(f"--kfold must be 0 (off) or at least 2, got {config.kfold}")
    warnings = backbone.check_input_size(size, weights)
    if weights == "none" and config.strategy != "scratch":
        warnings.append("a frozen backbone with random weights (--weights none) extracts little; "
                        "--strategy scratch trains it instead")
    backbone.check_alpha(config.alpha, weights)
    check_output_dir(Path(config.out), config.force)
    return backbone, size, weights, warnings


def _verbosity() -> int:
    return 1 if sys.stdout.isatty() else 2  # a progress bar on a terminal, one line per epoch in logs


def _optimizer(name: str, learning_rate: float, momentum: float):
    import keras

    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=momentum)
    if name == "nadam":
        return keras.optimizers.Nadam(learning_rate)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    return keras.optimizers.Adam(learning_rate)


def _augmentation(config: TrainConfig):
    import keras

    aug, seed = config.augment, config.seed
    layers = []
    if aug.flip != "none":
        layers.append(keras.layers.RandomFlip(aug.flip, seed=seed))
    if aug.rotation > 0:
        layers.append(keras.layers.RandomRotation(aug.rotation, fill_mode="reflect", seed=seed))
    if aug.shift > 0:
        layers.append(keras.layers.RandomTranslation(aug.shift, aug.shift, fill_mode="reflect", seed=seed))
    if aug.zoom > 0:
        layers.append(keras.layers.RandomZoom(aug.zoom, fill_mode="reflect", seed=seed))
    if aug.contrast > 0:
        layers.append(keras.layers.RandomContrast(aug.contrast, value_range=(0, 255), seed=seed))
    return keras.Sequential(layers, name="augmentation")


def _tf_dataset(split: SplitData, batch_size: int, shuffle: bool, augment, seed: int):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
    if shuffle:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _distribution_strategy():
    """MirroredStrategy over every GPU when there are several; the default strategy otherwise."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def _history_rows(history, phase: int, first_epoch: int, learning_rate: float) -> list[dict]:
    rows = []
    for i in range(len(history.history.get("loss", []))):
        row = {"epoch": first_epoch + i + 1, "phase": phase, "learning_rate": learning_rate}
        row.update({k: float(v[i]) for k, v in history.history.items()})
        rows.append(row)
    return rows


def fit_model(
    config: TrainConfig,
    backbone: Backbone,
    size: int,
    weights: str,
    num_classes: int,
    train: SplitData,
    val: SplitData,
    checkpoint: Path | None,
    log: Log,
) -> FitResult:
    """Build and train one model (both phases) on ``train``, early-stopping on ``val``."""
    import keras

    from transferkit.training.evaluate import batched_forward
    from transferkit.training.model import (
        build_classifier,
        find_backbone_layer,
        find_head_layer,
        resolve_unfreeze,
        unfreeze_top,
    )

    keras.utils.set_random_seed(config.seed)
    scratch = config.strategy == "scratch"
    with _distribution_strategy().scope():
        model = build_classifier(backbone, num_classes, size, weights, config.head, config.alpha,
                                 trainable_base=scratch)
    base, head = find_backbone_layer(model), find_head_layer(model)
    if config.runs_phase2:
        resolve_unfreeze(base, config.unfreeze)  # a bad layer name fails now, not after phase 1
    augment = _augmentation(config) if config.augment.active else None
    loss = keras.losses.SparseCategoricalCrossentropy()
    result = FitResult(model=model)
    verbose = _verbosity()

    def callbacks(best_so_far: float | None) -> list:
        cbs = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                             restore_best_weights=True, verbose=1)]
        if checkpoint is not None:
            cbs.append(keras.callbacks.ModelCheckpoint(
                str(checkpoint), monitor="val_loss", save_best_only=True, save_weights_only=True,
                initial_value_threshold=best_so_far))
        return cbs

    # Built only when a phase trains the full model: from_tensor_slices copies the image arrays.
    needs_pipeline = not config.cache_features or config.runs_phase2
    train_ds = _tf_dataset(train, config.batch_size, True, augment, config.seed) if needs_pipeline else None
    val_ds = _tf_dataset(val, config.batch_size, False, None, config.seed) if needs_pipeline else None

    # Phase 1: frozen base, train the head (or, for scratch, everything).
    title = "training from scratch" if scratch else "phase 1: frozen base, training the head"
    log(f"{title} ({config.epochs} epochs max, lr {config.learning_rate:g})")
    start = time.perf_counter()
    if config.cache_features:
        extractor = keras.Sequential([model.get_layer("preprocessing"), base], name="feature_extractor")
        train_features = batched_forward(extractor, train.images, config.batch_size)
        val_features = batched_forward(extractor, val.images, config.batch_size)
        result.timings["feature_extraction_seconds"] = time.perf_counter() - start
        log(f"cached features {train_features.shape[1:]} for {len(train)} + {len(val)} images "
            f"in {result.timings['feature_extraction_seconds']:.1f}s")
        head.compile(optimizer=_optimizer(config.optimizer, config.learning_rate, config.momentum), loss=loss,
                     metrics=["accuracy"])
        history = head.fit(train_features, train.labels, batch_size=config.batch_size, epochs=config.epochs,
                           validation_data=(val_features, val.labels), shuffle=True,
                           callbacks=callbacks(None)[:1], verbose=verbose)
        if checkpoint is not None:
            model.save_weights(checkpoint)
    else:
        model.compile(optimizer=_optimizer(config.optimizer, config.learning_rate, config.momentum), loss=loss,
                      metrics=["accuracy"])
        history = model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, shuffle=False,
                            callbacks=callbacks(None), verbose=verbose)
    result.timings["phase1_seconds"] = time.perf_counter() - start
    result.history += _history_rows(history, 1, 0, config.learning_rate)
    result.phase1_epochs = len(result.history)
    best_phase1 = min(row["val_loss"] for row in result.history)

    if config.runs_phase2:
        phase1_weights = model.get_weights()
        result.trainable_layers_phase2 = unfreeze_top(base, config.unfreeze)
        lr = config.resolved_fine_tune_lr
        log(f"phase 2: fine-tuning the top {config.unfreeze} backbone layers "
            f"({result.trainable_layers_phase2} with weights, BatchNormalization frozen), "
            f"{config.fine_tune_epochs} epochs max, lr {lr:g}")
        # Recompile after changing `trainable`, or the change is ignored.
        model.compile(optimizer=_optimizer(config.optimizer, lr, config.momentum), loss=loss, metrics=["accuracy"])
        start = time.perf_counter()
        history = model.fit(train_ds, validation_data=val_ds, initial_epoch=result.phase1_epochs,
                            epochs=result.phase1_epochs + config.fine_tune_epochs,
                            callbacks=callbacks(best_phase1), shuffle=False, verbose=verbose)
        result.timings["phase2_seconds"] = time.perf_counter() - start
        rows = _history_rows(history, 2, result.phase1_epochs, lr)
        result.history += rows
        result.phase2_epochs = len(rows)
        if rows and min(row["val_loss"] for row in rows) > best_phase1:
            model.set_weights(phase1_weights)
            result.notes.append("fine-tuning did not improve the validation loss; the phase-1 weights were kept")
            log(result.notes[-1])
    return result


def run_kfold(config: TrainConfig, backbone: Backbone, size: int, weights: str, dataset: Dataset, log: Log) -> dict:
    """K-fold cross-validation over train+val (the test split stays held out): mean and std per metric."""
    import keras
    from sklearn.model_selection import StratifiedKFold

    from transferkit.training.evaluate import batched_forward
    from transferkit.training.metrics import classification_metrics

    train, val = dataset.splits["train"], dataset.splits["val"]
    images = np.concatenate([train.images, val.images])
    labels = np.concatenate([train.labels, val.labels])
    try:
        folds = list(StratifiedKFold(config.kfold, shuffle=True, random_state=config.seed).split(images, labels))
    except ValueError as exc:
        raise UsageError(f"--kfold {config.kfold}: {exc}") from None
    rows = []
    for index, (fit_idx, held_idx) in enumerate(folds, start=1):
        log(f"fold {index}/{config.kfold}: {len(fit_idx)} training, {len(held_idx)} held-out images")
        keras.backend.clear_session()
        fold_train = SplitData([], labels[fit_idx], images[fit_idx])
        fold_val = SplitData([], labels[held_idx], images[held_idx])
        fit = fit_model(config, backbone, size, weights, len(dataset.class_names), fold_train, fold_val, None, log)
        metrics = classification_metrics(batched_forward(fit.model, fold_val.images), fold_val.labels,
                                         dataset.class_names)
        rows.append({"fold": index, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
                     "macro_f1": metrics["macro_f1"], "epochs": len(fit.history)})
    keras.backend.clear_session()
    summary = {
        name: {"mean": float(np.mean([r[name] for r in rows])), "std": float(np.std([r[name] for r in rows]))}
        for name in ("accuracy", "loss", "macro_f1")
    }
    return {"k": config.kfold, "folds": rows, "summary": summary}


def _write_history(path: Path, rows: list[dict]) -> None:
    columns = ["epoch", "phase", "learning_rate"] + sorted({k for r in rows for k in r} - {"epoch", "phase",
                                                                                          "learning_rate"})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


TRAINING_LIBRARIES = ("tensorflow", "keras", "numpy", "pillow", "scikit-learn")


def train(config: TrainConfig, log: Log = print) -> TrainResult:
    """Run one training job and write the run directory ``config.out`` atomically."""
    backbone, size, weights, warnings = validate_config(config)
    for warning in warnings:
        log(f"warning: {warning}")
    import keras
    import tensorflow as tf

    from transferkit.training import plots, report
    from transferkit.training.evaluate import batched_forward
    from transferkit.training.metrics import classification_metrics

    gpus = tf.config.list_physical_devices("GPU")
    previous_policy = keras.mixed_precision.global_policy().name
    if config.mixed_precision:
        if not gpus:
            raise UsageError("--mixed-precision needs a GPU and none is visible; drop the flag on CPU")
        keras.mixed_precision.set_global_policy("mixed_float16")
    if not gpus:
        # Reproducible on CPU for a given --seed; GPU kernels may lack deterministic implementations.
        tf.config.experimental.enable_op_determinism()
    total_start = time.perf_counter()

    log(f"reading {config.data} at {size}x{size} px")
    progress = keras.utils.Progbar(None, unit_name="image", verbose=1 if sys.stdout.isatty() else 0)

    def on_decoded(done: int, total: int) -> None:
        progress.target = total
        progress.update(done)

    start = time.perf_counter()
    dataset = load_dataset(Path(config.data), size, config.val_fraction, config.test_fraction, config.seed,
                           config.strict, on_decoded)
    decode_seconds = time.perf_counter() - start
    counts = {name: len(split) for name, split in dataset.splits.items()}
    log(f"decoded {sum(counts.values())} images of {len(dataset.class_names)} classes in {decode_seconds:.1f}s "
        f"(train {counts['train']}, val {counts['val']}, test {counts['test']}); "
        f"skipped {len(dataset.skipped)} unreadable")
    for item in dataset.skipped:
        log(f"  skipped {item['file']}: {item['reason']}")

    try:
        kfold = run_kfold(config, backbone, size, weights, dataset, log) if config.kfold else None
        with atomic_output_dir(Path(config.out), config.force) as staging:
            (staging / "checkpoints").mkdir()
            fit = fit_model(config, backbone, size, weights, len(dataset.class_names), dataset.splits["train"],
                            dataset.splits["val"], staging / "checkpoints" / "best.weights.h5", log)
            model = fit.model
            log("evaluating on the test split")
            probabilities = {name: batched_forward(model, split.images) for name, split in dataset.splits.items()}
            evaluations = {name: classification_metrics(probabilities[name], split.labels, dataset.class_names)
                           for name, split in dataset.splits.items()}
            timings = {"decode_seconds": decode_seconds, **fit.timings,
                       "total_seconds": time.perf_counter() - total_start}
            diagnosis = report.diagnose(fit.history, evaluations, dataset, fit.phase1_epochs)
            metrics = {
                "test": evaluations["test"],
                "val": {k: evaluations["val"][k] for k in ("accuracy", "loss", "samples")},
                "train": {k: evaluations["train"][k] for k in ("accuracy", "loss", "samples")},
                "epochs": {"phase1": fit.phase1_epochs, "phase2": fit.phase2_epochs},
                "timings": timings,
                "diagnosis": diagnosis,
                "data": {"counts": dataset.counts(), "skipped": dataset.skipped,
                         "ignored_non_image_files": dataset.ignored_files},
                "notes": fit.notes,
            }
            if kfold:
                metrics["kfold"] = kfold
            resolved = {
                **config.to_dict(), "backbone": backbone.name, "image_size": size, "weights_resolved": weights,
                "fine_tune_lr": config.resolved_fine_tune_lr if config.runs_phase2 else None,
                "preprocessing": backbone.preprocessing, "family": backbone.family,
                "input": {"name": "image", "shape": [None, size, size, 3], "dtype": "float32",
                          "range": "RGB 0-255"},
                "num_classes": len(dataset.class_names), "gpus": len(gpus),
                "mixed_precision": config.mixed_precision, "versions": library_versions(TRAINING_LIBRARIES),
            }
            model.save(staging / "model.keras")
            (staging / "labels.json").write_text(json.dumps(dataset.class_names, indent=2) + "\n")
            (staging / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
            split_record = dataset.split_record(config.seed, {"val": config.val_fraction,
                                                              "test": config.test_fraction})
            (staging / "split.json").write_text(json.dumps(split_record, indent=2) + "\n")
            _write_history(staging / "history.csv", fit.history)
            (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            plots.learning_curves(fit.history, fit.phase1_epochs, staging / "learning_curves.png")
            plots.confusion_matrix(probabilities["test"], dataset.splits["test"].labels, dataset.class_names,
                                   staging / "confusion_matrix.png")
            plots.misclassified(probabilities["test"], dataset.splits["test"], dataset.class_names,
                                staging / "misclassified.png")
            (staging / "report.md").write_text(report.render(resolved, metrics, dataset, fit))
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return TrainResult(run_dir=Path(config.out).absolute(), metrics=metrics, config=resolved)
