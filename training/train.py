"""One training run: data -> phase 1 (frozen base) -> phase 2 (fine-tune) -> evaluation -> run directory.

:func:`train` is the library entry point behind ``transferkit train``. The run is made in a kept work directory
(:mod:`transferkit.training.workdir`) and renamed to ``config.out`` when complete. The model and checkpoints are
saved before any optional step (k-fold, evaluation, plots, report); a failing optional step is recorded in
``metrics.json`` and the run is still complete. An interrupted run keeps its state; ``resume=True`` continues it.
The recipe follows the keras.io transfer-learning guide, with the optimizer and schedule of
:mod:`transferkit.training.recipe`.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.core.atomic import mark_output, write_file_durably
from transferkit.core.backbones import Backbone, get_backbone
from transferkit.core.errors import TransferkitError, UsageError
from transferkit.core.progress import Progress
from transferkit.core.stopping import raise_if_stop_requested, stop_exit_code
from transferkit.core.system import library_versions
from transferkit.training import rundir, workdir
from transferkit.training.config import TrainConfig, changed_settings
from transferkit.training.data import Dataset, SplitData, check_data_dir, load_dataset
from transferkit.training.workdir import RunInterrupted

logger = logging.getLogger(__name__)
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
    calibration: dict = field(default_factory=dict)  # applied, temperature, reason (training/calibration.py)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    config: dict


def validate_config(config: TrainConfig) -> tuple[Backbone, int, str, list[str]]:
    """Check what the configuration model cannot (the backbone registry, files on disk) before any data is read.
    Returns (backbone, size, weights, warnings)."""
    backbone = get_backbone(config.backbone)
    size = config.image_size or backbone.default_size
    check_data_dir(Path(config.data))
    weights = "none" if config.strategy == "scratch" else config.weights
    if weights not in ("imagenet", "none") and not Path(weights).exists():
        raise UsageError(f"--weights must be imagenet, none, a weights file or a run directory; {weights} not found")
    warnings = backbone.check_input_size(size, weights)
    if weights == "none" and config.strategy != "scratch":
        warnings.append("a frozen backbone with random weights (--weights none) extracts little; "
                        "--strategy scratch trains it instead")
    backbone.check_alpha(config.alpha, weights)
    workdir.prepare(Path(config.out), config.force, config.resume, Path(config.data) if config.data else None)
    return backbone, size, weights, warnings


def _verbosity() -> int:
    return 1 if sys.stdout.isatty() else 2  # a progress bar on a terminal, one line per epoch in logs


@contextmanager
def run_scope(config: TrainConfig, gpus: list) -> Iterator[None]:
    """Mixed precision and (on CPU) TensorFlow op determinism for the run only: both are process-wide switches,
    restored on exit so a library caller's later work is unaffected."""
    import keras
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    previous_policy = keras.mixed_precision.global_policy().name
    was_deterministic = tf_config.is_op_determinism_enabled()
    try:
        if config.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        if not gpus:
            # Reproducible on CPU for a given --seed; GPU kernels may lack deterministic implementations.
            tf.config.experimental.enable_op_determinism()
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        if not was_deterministic:
            tf_config.disable_op_determinism()


def _epoch_logger(work: Path | None, phase: int, peak: float):
    """A callback writing one history row per epoch (to the work directory, so a resumed run keeps its curve)."""
    import keras

    from transferkit.training.recipe import current_learning_rate

    rows: list[dict] = []

    class EpochLog(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise_if_stop_requested()  # a signal whose exception TensorFlow swallowed still stops training

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, "phase": phase, "learning_rate": peak,
                   "epoch_end_lr": current_learning_rate(self.model)}
            row.update({k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"})
            rows.append(row)
            if work is not None:
                workdir.append_history(work, row)

    return EpochLog(), rows


def _split_head(head):
    """(leading weightless pooling layers, the rest) of the head: --cache-features caches after pooling."""
    import keras

    pooling = (keras.layers.GlobalAveragePooling2D, keras.layers.AveragePooling2D, keras.layers.Flatten)
    layers = [layer for layer in head.layers if not isinstance(layer, keras.layers.InputLayer)]
    n = 0
    while n < len(layers) and isinstance(layers[n], pooling):
        n += 1
    return layers[:n], layers[n:]


@dataclass
class _Fit:
    """What the phases of one fit share: the model and its parts, the data and pipelines, the recipe's numbers, and
    the epochs an interrupted run already logged (``done``)."""

    config: TrainConfig
    model: Any  # keras.Model
    base: Any
    head: Any
    train: SplitData
    val: SplitData
    num_classes: int
    work: Path | None
    log: Log
    verbose: int
    steps: int
    class_weight: dict[int, float] | None
    done: list[dict]
    train_ds: Any  # tf.data.Dataset, or None when no phase trains the full model
    val_ds: Any


def fit_model(
    config: TrainConfig,
    backbone: Backbone,
    size: int,
    weights: str,
    num_classes: int,
    train: SplitData,
    val: SplitData,
    work: Path | None,
    log: Log,
) -> FitResult:
    """Build and train one model (both phases) on ``train``, early-stopping on ``val``. With ``work``, progress is
    saved there after every epoch and a run interrupted earlier continues where it stopped."""
    import keras

    keras.utils.set_random_seed(config.seed)
    fit = _prepare_fit(config, backbone, size, weights, num_classes, train, val, work, log)
    result = FitResult(model=fit.model)
    best_phase1 = _phase1(fit, result)
    if config.runs_phase2:
        _phase2(fit, result, best_phase1)
    if work is not None:
        workdir.save_durably(work / "checkpoints" / "best.weights.h5", fit.model.save_weights)
    return result


def _prepare_fit(config: TrainConfig, backbone: Backbone, size: int, weights: str, num_classes: int,
                 train: SplitData, val: SplitData, work: Path | None, log: Log) -> _Fit:
    """The model, the input pipelines and the recipe's numbers, made in the order the seeded random state sees."""
    from transferkit.training import recipe
    from transferkit.training.model import build_classifier, find_backbone_layer, find_head_layer, resolve_unfreeze
    from transferkit.training.pipeline import augmentation, streaming_dataset

    with _distribution_strategy().scope():
        model = build_classifier(backbone, num_classes, size, weights, config.head, config.alpha,
                                 trainable_base=config.strategy == "scratch")
    base = find_backbone_layer(model)
    if config.runs_phase2:
        resolve_unfreeze(base, config.unfreeze)  # a bad layer name fails now, not after phase 1
    augment = augmentation(config) if config.augment.active else None
    # Built only when a phase trains the full model.
    needs_pipeline = not config.cache_features or config.runs_phase2
    return _Fit(
        config=config, model=model, base=base, head=find_head_layer(model), train=train, val=val,
        num_classes=num_classes, work=work, log=log, verbose=_verbosity(),
        steps=recipe.steps_per_epoch(len(train), config.batch_size),
        class_weight=recipe.class_weights(config, train.labels, num_classes),
        done=workdir.read_history(work) if work is not None else [],
        train_ds=(streaming_dataset(train, config.batch_size, num_classes, True, config.seed, augment)
                  if needs_pipeline else None),
        val_ds=streaming_dataset(val, config.batch_size, num_classes, False, config.seed) if needs_pipeline else None,
    )


def _callbacks(fit: _Fit, phase: int, peak: float, start_from_epoch: int, backup: bool = True
               ) -> tuple[list, list[dict]]:
    """The phase's callbacks (epoch log, [backup,] early stopping) and the list the epoch log fills."""
    import keras

    epoch_log, rows = _epoch_logger(fit.work, phase, peak)
    callbacks = [epoch_log]
    if fit.work is not None and backup:
        # After the epoch log, so the backup never runs ahead of the log: an epoch whose line a full disk cut off
        # was not saved either, and is trained again from the previous backup (workdir.repair_history). An epoch
        # logged but not saved is trained again and logged again (the later line wins).
        callbacks.append(workdir.backup_callback(fit.work / workdir.BACKUP_DIR / f"phase{phase}"))
    callbacks += [keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=fit.config.patience, restore_best_weights=fit.config.restore_best, verbose=1,
        start_from_epoch=start_from_epoch)]
    return callbacks, rows


def _phase1(fit: _Fit, result: FitResult) -> float:
    """Phase 1: frozen base, train the head (or, for scratch, everything); restored instead when an interrupted run
    finished it. Returns the phase's best validation loss."""
    title = "training from scratch" if fit.config.strategy == "scratch" else "phase 1: frozen base, training the head"
    phase1_file = fit.work / "checkpoints" / "phase1.weights.h5" if fit.work is not None else None
    start = time.perf_counter()
    if phase1_file is not None and phase1_file.is_file():
        fit.model.load_weights(phase1_file)
        result.history = [row for row in fit.done if row["phase"] == 1]
        fit.log(f"{title}: done in the interrupted run ({len(result.history)} epochs), weights restored")
    else:
        _train_phase1(fit, result, title, start)
        if phase1_file is not None:
            phase1_file.parent.mkdir(parents=True, exist_ok=True)
            workdir.save_durably(phase1_file, fit.model.save_weights)
    result.timings["phase1_seconds"] = time.perf_counter() - start
    result.phase1_epochs = len(result.history)
    return min(row["val_loss"] for row in result.history)


def _train_phase1(fit: _Fit, result: FitResult, title: str, start: float) -> None:
    from transferkit.training import recipe

    config = fit.config
    # Cached-feature training keeps no backup (it is quick to redo): it restarts, so drop its logged epochs. Else
    # the backup says where training continues; rows logged beyond it are trained (and logged) again.
    saved = 0 if config.cache_features else workdir.backup_epoch(fit.work, 1)
    resumed = [row for row in fit.done if row["phase"] == 1 and row["epoch"] <= saved]
    lr = config.learning_rate
    fit.log(f"{title} ({config.epochs} epochs max, lr {lr:g}, {config.schedule} schedule, {config.optimizer})"
            + (f", resuming after epoch {len(resumed)}" if resumed else ""))
    schedule = recipe.learning_rate_schedule(config, lr, config.epochs, fit.steps)
    if config.cache_features:
        rows = _fit_head_on_features(fit, result, schedule, start)
    else:
        recipe.compile_for_training(fit.model, config, schedule)
        callbacks, rows = _callbacks(fit, 1, lr, config.resolved_early_stopping_start)
        fit.model.fit(fit.train_ds, validation_data=fit.val_ds, epochs=config.epochs, shuffle=False,
                      class_weight=fit.class_weight, callbacks=callbacks, verbose=fit.verbose)
    result.history = resumed + [row for row in rows if row["epoch"] > len(resumed)]


def _fit_head_on_features(fit: _Fit, result: FitResult, schedule, start: float) -> list[dict]:
    """--cache-features: run the frozen base (and the head's pooling) once, then train the rest of the head on the
    pooled features. Returns the logged epochs."""
    import keras

    from transferkit.training import recipe
    from transferkit.training.evaluate import batched_forward
    from transferkit.training.pipeline import one_hot

    config, train, val = fit.config, fit.train, fit.val
    pool_layers, trainable_layers = _split_head(fit.head)
    extractor = keras.Sequential([fit.model.get_layer("preprocessing"), fit.base, *pool_layers],
                                 name="feature_extractor")
    train_features = batched_forward(extractor, train.images, config.batch_size)
    val_features = batched_forward(extractor, val.images, config.batch_size)
    result.timings["feature_extraction_seconds"] = time.perf_counter() - start
    fit.log(f"cached pooled features {train_features.shape[1:]} for {len(train)} + {len(val)} images "
            f"in {result.timings['feature_extraction_seconds']:.1f}s")
    features_in = keras.Input(train_features.shape[1:], name="pooled_features")
    x = features_in
    for layer in trainable_layers:
        x = layer(x)
    pooled_head = keras.Model(features_in, x, name="pooled_head")  # shares the head's weights
    recipe.compile_for_training(pooled_head, config, schedule)
    callbacks, rows = _callbacks(fit, 1, config.learning_rate, config.resolved_early_stopping_start, backup=False)
    pooled_head.fit(train_features, one_hot(train.labels, fit.num_classes), batch_size=config.batch_size,
                    epochs=config.epochs, validation_data=(val_features, one_hot(val.labels, fit.num_classes)),
                    shuffle=True, class_weight=fit.class_weight, callbacks=callbacks, verbose=fit.verbose)
    return rows


def _phase2(fit: _Fit, result: FitResult, best_phase1: float) -> None:
    """Phase 2: unfreeze the top of the base and fine-tune; phase 1's weights are kept unless it did better."""
    from transferkit.training import recipe
    from transferkit.training.model import unfreeze_top

    config, model = fit.config, fit.model
    phase1_weights = model.get_weights()
    result.trainable_layers_phase2 = unfreeze_top(fit.base, config.unfreeze)
    lr = config.resolved_fine_tune_lr
    saved = workdir.backup_epoch(fit.work, 2)  # epochs are counted from the run's start, phase 1 included
    resumed = [row for row in fit.done if row["phase"] == 2 and row["epoch"] <= saved]
    fit.log(f"phase 2: fine-tuning the top {config.unfreeze} backbone layers "
            f"({result.trainable_layers_phase2} with weights, BatchNormalization frozen), "
            f"{config.fine_tune_epochs} epochs max, lr {lr:g}"
            + (f", resuming after epoch {result.phase1_epochs + len(resumed)}" if resumed else ""))
    schedule = recipe.learning_rate_schedule(config, lr, config.fine_tune_epochs, fit.steps)
    # Recompile after changing `trainable`, or the change is ignored.
    recipe.compile_for_training(model, config, schedule)
    start = time.perf_counter()
    callbacks, rows = _callbacks(fit, 2, lr, 0)
    model.fit(fit.train_ds, validation_data=fit.val_ds, initial_epoch=result.phase1_epochs,
              epochs=result.phase1_epochs + config.fine_tune_epochs, class_weight=fit.class_weight,
              callbacks=callbacks, shuffle=False, verbose=fit.verbose)
    result.timings["phase2_seconds"] = time.perf_counter() - start
    seen = {row["epoch"] for row in rows}
    phase2 = [row for row in resumed if row["epoch"] not in seen] + rows
    result.history += phase2
    result.phase2_epochs = len(phase2)
    if phase2 and min(row["val_loss"] for row in phase2) > best_phase1:
        model.set_weights(phase1_weights)
        result.notes.append("fine-tuning did not improve the validation loss; the phase-1 weights were kept")
        fit.log(result.notes[-1])


def _distribution_strategy():
    """MirroredStrategy over every GPU when there are several; the default strategy otherwise."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def _subset(images, index: np.ndarray):
    from transferkit.training.cache import PixelRows

    if isinstance(images, PixelRows):
        return PixelRows(images.store, images.rows[index])
    return images[index]


def _concat(a, b):
    from transferkit.training.cache import PixelRows

    if isinstance(a, PixelRows) and isinstance(b, PixelRows) and a.store is b.store:
        return PixelRows(a.store, np.concatenate([a.rows, b.rows]))
    return np.concatenate([np.asarray(a), np.asarray(b)])


def run_kfold(config: TrainConfig, backbone: Backbone, size: int, weights: str, dataset: Dataset, log: Log) -> dict:
    """K-fold cross-validation over train+val (the test split stays held out): each fold early-stops on an inner
    validation split carved from its training part and is scored on its held-out fold. Mean and std per metric."""
    import keras
    from sklearn.model_selection import StratifiedKFold, train_test_split

    from transferkit.core.metrics import classification_metrics
    from transferkit.training.evaluate import batched_forward

    train, val = dataset.splits["train"], dataset.splits["val"]
    images = _concat(train.images, val.images)
    labels = np.concatenate([train.labels, val.labels])
    inner_fraction = config.val_fraction / (1 - config.test_fraction) if config.val_fraction else 0.15
    try:
        folds = list(StratifiedKFold(config.kfold, shuffle=True, random_state=config.seed).split(labels, labels))
        inner = [train_test_split(fit_idx, test_size=inner_fraction, stratify=labels[fit_idx],
                                  random_state=config.seed) for fit_idx, _ in folds]
    except ValueError as exc:
        raise UsageError(f"--kfold {config.kfold}: {exc}") from None
    rows = []
    for index, ((_, held_idx), (fit_idx, stop_idx)) in enumerate(zip(folds, inner), start=1):
        log(f"fold {index}/{config.kfold}: {len(fit_idx)} training, {len(stop_idx)} early-stopping, "
            f"{len(held_idx)} held-out images")
        keras.backend.clear_session()
        fold_train = SplitData([], labels[fit_idx], _subset(images, fit_idx))
        fold_stop = SplitData([], labels[stop_idx], _subset(images, stop_idx))
        fold_held = SplitData([], labels[held_idx], _subset(images, held_idx))
        fit = fit_model(config, backbone, size, weights, len(dataset.class_names), fold_train, fold_stop, None, log)
        metrics = classification_metrics(batched_forward(fit.model, fold_held.images), fold_held.labels,
                                         dataset.class_names)
        rows.append({"fold": index, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
                     "macro_f1": metrics["macro_f1"], "epochs": len(fit.history),
                     "train": len(fit_idx), "early_stopping": len(stop_idx), "held_out": len(held_idx)})
    keras.backend.clear_session()
    summary = {
        name: {"mean": float(np.mean([r[name] for r in rows])), "std": float(np.std([r[name] for r in rows]))}
        for name in ("accuracy", "loss", "macro_f1")
    }
    return {"k": config.kfold, "folds": rows, "summary": summary}


def _write_history(path: Path, rows: list[dict]) -> None:
    fixed = ["epoch", "phase", "learning_rate", "epoch_end_lr"]
    columns = fixed + sorted({k for r in rows for k in r} - set(fixed))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_file_durably(path, text.getvalue())


TRAINING_LIBRARIES = ("tensorflow", "keras", "numpy", "pillow", "scikit-learn")


def _check_resumable(work: Path, resolved: rundir.RunConfig) -> None:
    """--resume continues the kept run only with the settings it was started with (the resume-invariant fields)."""
    changed = changed_settings(rundir.read_config(work), resolved)
    if changed:
        raise UsageError(f"--resume: the kept run in {work} has other settings than this command ({'; '.join(changed)})"
                         "; use the same settings, or --force to start over")


class _DecodeProgress:
    """The progress bar of decoding a dataset into the image cache. ``load_dataset`` reports (done, total) only
    when there is something to decode, so the bar appears then, with its total."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.reported = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(total, label="images")
        self.bar.update(done - self.reported)
        self.reported = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(config: TrainConfig, log: Log = logger.info) -> TrainResult:
    """Run one training job and write the run directory ``config.out`` (atomically: all of it or none)."""
    backbone, size, weights, warnings = validate_config(config)
    for warning in warnings:
        log(f"warning: {warning}")
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if config.mixed_precision and not gpus:
        raise UsageError("--mixed-precision needs a GPU and none is visible; drop the flag on CPU")
    out = Path(config.out).absolute()
    work = workdir.work_dir_for(out)
    total_start = time.perf_counter()
    dataset, decode_seconds = _load(config, size, log)
    resolved = _resolve(config, backbone, size, weights, dataset, gpus)
    if config.resume:
        _check_resumable(work, resolved)
        log(f"resuming the interrupted run kept in {work}")
        if (cut := workdir.repair_history(work)) is not None:
            log(f"warning: {cut}")
    else:
        _start_work_dir(work, config, resolved, dataset)

    with run_scope(config, gpus):
        model, fit = _train_and_save(config, backbone, size, weights, dataset, work, log)
        metrics = _report(config, backbone, size, weights, dataset, work, model, fit, resolved,
                          {"decode_seconds": decode_seconds, **fit.timings}, total_start, log)
    if stop_exit_code() is not None:  # a signal arrived and a library swallowed its exception: keep, don't publish
        raise _interrupted(work, "stopped", stop_exit_code())
    run_dir = workdir.finalize(work, out, config.force)
    return TrainResult(run_dir=run_dir, metrics=metrics, config=resolved.model_dump(mode="json"))


def _load(config: TrainConfig, size: int, log: Log) -> tuple[Dataset, float]:
    """The dataset, decoded at ``size`` (through the cache), and the seconds it took; logs what was found."""
    log(f"reading {config.data} at {size}x{size} px")
    start = time.perf_counter()
    progress = _DecodeProgress()
    try:
        dataset = load_dataset(Path(config.data), size, config.val_fraction, config.test_fraction, config.seed,
                               config.strict, progress)
    finally:
        progress.close()
    decode_seconds = time.perf_counter() - start
    counts = {name: len(split) for name, split in dataset.splits.items()}
    log(f"{sum(counts.values())} images of {len(dataset.class_names)} classes in {decode_seconds:.1f}s "
        f"({dataset.cache['decoded']} decoded, {dataset.cache['reused']} from the cache "
        f"{dataset.cache['directory']}; train {counts['train']}, val {counts['val']}, test {counts['test']}); "
        f"skipped {len(dataset.skipped)} unreadable")
    for item in dataset.skipped:
        log(f"  skipped {item['file']}: {item['reason']}")
    return dataset, decode_seconds


def _resolve(config: TrainConfig, backbone: Backbone, size: int, weights: str, dataset: Dataset,
             gpus: list) -> rundir.RunConfig:
    """``config.json``: the configuration with every default resolved, and the environment."""
    return rundir.RunConfig(
        **{**config.to_dict(), "image_size": size, "backbone": backbone.name, "weights_resolved": weights,
           "fine_tune_lr": config.resolved_fine_tune_lr if config.runs_phase2 else None,
           "early_stopping_start": config.resolved_early_stopping_start, "preprocessing": backbone.preprocessing,
           "family": backbone.family, "input": {"shape": [None, size, size, 3]},
           "num_classes": len(dataset.class_names), "gpus": len(gpus),
           "versions": library_versions(TRAINING_LIBRARIES)})


def _start_work_dir(work: Path, config: TrainConfig, resolved: rundir.RunConfig, dataset: Dataset) -> None:
    (work / "checkpoints").mkdir(parents=True)
    mark_output(work)  # the interrupted run's directory is transferkit's: --force may start it over
    rundir.write_config(work, resolved)
    rundir.write_split(work, rundir.SplitRecord(**dataset.split_record(
        config.seed, {"val": config.val_fraction, "test": config.test_fraction})))
    rundir.write_json(work / rundir.LABELS, dataset.class_names)


def _interrupted(work: Path, what: str, exit_code: int) -> RunInterrupted:
    epochs = len(workdir.read_history(work))
    error = RunInterrupted(
        f"{what} after {epochs} finished epoch(s); the run so far is kept in {work}: rerun the same command "
        f"with --resume to continue, or with --force to start over")
    error.exit_code = exit_code
    return error


def _train_and_save(config, backbone, size, weights, dataset, work: Path, log: Log):
    """Train (or reload what a resumed run already trained) and save model.keras, history and checkpoints."""
    from transferkit.training.model import float32_inference_model, load_run_model

    model_path = work / "model.keras"
    history_rows = workdir.read_history(work)
    if config.resume and model_path.is_file():
        log("the interrupted run had finished training; reloading its model")
        model = load_run_model(work)
        fit = FitResult(model=model, history=history_rows,
                        phase1_epochs=sum(1 for r in history_rows if r["phase"] == 1),
                        phase2_epochs=sum(1 for r in history_rows if r["phase"] == 2),
                        calibration=_read_calibration(work))
        return model, fit
    try:
        fit = fit_model(config, backbone, size, weights, len(dataset.class_names), dataset.splits["train"],
                        dataset.splits["val"], work, log)
        # float32 graph for inference and export, also after mixed_float16 training (weights are float32 anyway).
        model = float32_inference_model(fit.model)
        fit.calibration = _calibrate(config, model, dataset.splits["val"], log)
        rundir.write_json(work / CALIBRATION_FILE, fit.calibration)
        workdir.save_durably(model_path, model.save)
        _write_history(work / "history.csv", fit.history)
    except KeyboardInterrupt:
        if workdir.discard_if_untrained(work):
            raise _interrupted(work, "interrupted", 130) from None
        raise
    except SystemExit as exc:  # SIGTERM, turned into SystemExit by the CLI
        if workdir.discard_if_untrained(work):
            raise _interrupted(work, "terminated", exc.code if isinstance(exc.code, int) else 143) from None
        raise
    except BaseException as exc:
        if workdir.discard_if_untrained(work):
            if stop_exit_code() is not None:  # a signal that came out as another exception
                raise _interrupted(work, "stopped", stop_exit_code()) from None
            detail = str(exc) if isinstance(exc, TransferkitError) else f"{type(exc).__name__}: {exc}"
            raise _interrupted(work, f"training failed ({detail})", 1) from exc
        raise
    log(f"saved {model_path.name} and checkpoints")
    return model, fit


CALIBRATION_FILE = "checkpoints/calibration.json"


def _calibrate(config: TrainConfig, model, val: SplitData, log: Log) -> dict:
    """Fit temperature scaling on the validation split and fold T into ``model`` (in place), or say why not."""
    from transferkit.training import calibration
    from transferkit.training.evaluate import batched_forward

    reason = calibration.skip_reason(model, len(val), config.calibrate)
    if reason is not None:
        log(f"calibration skipped: {reason}")
        return {"applied": False, "temperature": None, "reason": reason}
    temperature = calibration.fit_temperature(batched_forward(model, val.images), val.labels)
    reason = calibration.boundary_reason(temperature)
    if reason is not None:
        log(f"calibration skipped: {reason}")
        return {"applied": False, "temperature": None, "reason": reason}
    calibration.fold_temperature(model, temperature)
    log(f"calibration: temperature {temperature:.4f} fitted on {len(val)} validation images, folded into the model")
    return {"applied": True, "temperature": temperature, "reason": None}


def _read_calibration(work: Path) -> dict:
    import json

    path = work / CALIBRATION_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return {"applied": False, "temperature": None, "reason": "not recorded by the interrupted run"}


def _calibration_record(calibration_info: dict, dataset: Dataset, probabilities: dict) -> dict:
    """metrics.json's ``calibration``: ECE and NLL of the uncalibrated model (recovered from the saved model's
    probabilities q as softmax(T log q)) and of the saved, calibrated one, on val and test; argmax unchanged."""
    from transferkit.core.metrics import ECE_BINS, expected_calibration_error, negative_log_likelihood
    from transferkit.training.calibration import apply_temperature

    temperature = calibration_info.get("temperature") if calibration_info.get("applied") else None
    record = {**calibration_info, "bins": ECE_BINS}
    unchanged = True
    for name in ("val", "test"):
        after = probabilities[name]
        labels = dataset.splits[name].labels
        if not len(labels):
            continue
        before = apply_temperature(after, 1 / temperature) if temperature else after
        unchanged = unchanged and bool(np.array_equal(before.argmax(axis=1), after.argmax(axis=1)))
        record[name] = {"samples": int(len(labels)), **{
            key: {"ece": expected_calibration_error(p, labels), "nll": negative_log_likelihood(p, labels)}
            for key, p in (("before", before), ("after", after))}}
    record["argmax_unchanged"] = unchanged
    return record


def uncalibrated(probabilities: np.ndarray, calibration_info: dict | None) -> np.ndarray:
    """The probabilities of the model before temperature scaling, from the saved model's."""
    from transferkit.training.calibration import apply_temperature

    info = calibration_info or {}
    return apply_temperature(probabilities, 1 / info["temperature"]) if info.get("applied") else probabilities


class _OptionalSteps:
    """Runs the steps a finished run can do without: a failure is logged and recorded, and the run goes on."""

    def __init__(self, work: Path, log: Log) -> None:
        self.work, self.log = work, log
        self.failures: list[dict[str, str]] = []

    def run(self, step: str, function: Callable, *args):
        try:
            return function(*args)
        except (KeyboardInterrupt, SystemExit):
            raise _interrupted(self.work, f"interrupted during {step}", 130) from None
        except Exception as exc:
            self.failures.append({"step": step, "error": f"{type(exc).__name__}: {exc}"})
            self.log(f"warning: {step} failed ({type(exc).__name__}: {exc}); the run is complete without it")
            logger.debug("%s failed:\n%s", step, traceback.format_exc())
            return None


def _report(config, backbone, size, weights, dataset, work, model, fit, resolved, timings, total_start, log):
    """The optional steps: k-fold, evaluation, metrics, plots, report. A failure is recorded, not fatal."""
    from transferkit.training import report

    optional = _OptionalSteps(work, log)
    kfold = optional.run("k-fold cross-validation", run_kfold, config, backbone, size, weights, dataset, log) \
        if config.kfold else None
    evaluated = optional.run("evaluation", _evaluate, model, dataset, log)
    probabilities, evaluations = evaluated if evaluated else (None, None)
    diagnosis = optional.run("diagnosis", report.diagnose, fit.history, evaluations, dataset, fit.phase1_epochs) \
        if evaluations else None
    metrics = _metrics(fit, dataset, evaluations, diagnosis, kfold, timings, total_start)
    if probabilities is not None:
        metrics["calibration"] = optional.run("calibration scores", _calibration_record, fit.calibration, dataset,
                                              probabilities)
        _plots(optional, fit, dataset, probabilities, work)
    if evaluations and diagnosis:
        present = {k: v for k, v in metrics.items() if v is not None}
        text = optional.run("report", report.render, resolved.model_dump(mode="json"),
                            {**present, "failures": optional.failures}, dataset, fit)
        if text is not None:
            (work / "report.md").write_text(text)
    metrics["failures"] = optional.failures
    record = rundir.RunMetrics(**metrics)
    rundir.write_metrics(work, record)
    return record.model_dump(mode="json", exclude_none=True)


def _evaluate(model, dataset: Dataset, log: Log) -> tuple[dict, dict]:
    """Every split's class probabilities and metrics."""
    from transferkit.core.metrics import classification_metrics
    from transferkit.training.evaluate import batched_forward

    log("evaluating on the test split")
    probabilities = {name: batched_forward(model, split.images) for name, split in dataset.splits.items()}
    evaluations = {name: classification_metrics(probabilities[name], split.labels, dataset.class_names)
                   for name, split in dataset.splits.items()}
    return probabilities, evaluations


def _metrics(fit: FitResult, dataset: Dataset, evaluations: dict | None, diagnosis: dict | None, kfold: dict | None,
             timings: dict[str, float], total_start: float) -> dict:
    """The content of ``metrics.json`` but its failures (a later step may still fail)."""
    metrics = {
        "epochs": {"phase1": fit.phase1_epochs, "phase2": fit.phase2_epochs},
        "timings": {**timings, "total_seconds": time.perf_counter() - total_start},
        "diagnosis": diagnosis,
        "data": {"counts": dataset.counts(), "skipped": dataset.skipped,
                 "ignored_non_image_files": dataset.ignored_files, "cache": dataset.cache},
        "notes": fit.notes,
        "kfold": kfold,
    }
    if evaluations:
        metrics["test"] = evaluations["test"]
        metrics.update({name: {k: evaluations[name][k] for k in ("accuracy", "loss", "samples", "ece", "nll")}
                        for name in ("val", "train")})
    return metrics


def _plots(optional: _OptionalSteps, fit: FitResult, dataset: Dataset, probabilities: dict, work: Path) -> None:
    from transferkit.training import plots

    test = dataset.splits["test"]
    test_probabilities = probabilities["test"]
    optional.run("learning curves plot", plots.learning_curves, fit.history, fit.phase1_epochs,
                 work / "learning_curves.png")
    optional.run("confusion matrix plot", plots.confusion_matrix, test_probabilities, test.labels,
                 dataset.class_names, work / "confusion_matrix.png")
    optional.run("reliability diagram", plots.reliability, probabilities,
                 uncalibrated(probabilities["val"], fit.calibration), uncalibrated(test_probabilities, fit.calibration),
                 dataset, fit.calibration, work / "reliability.png")
    optional.run("misclassified plot", functools.partial(plots.misclassified, model=fit.model), test_probabilities,
                 test, dataset.class_names, work / "misclassified.png")
