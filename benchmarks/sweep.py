"""The per-backbone table: size, parameters, depth, latency per backend and batch size, accuracy, speed-up.

Sweep mode builds each registry backbone with a small classification head, exports it through the real export
stage (so the ONNX/SavedModel rows are the files a user would serve) and times every backend side by side. Bundle
mode times trained bundles and adds accuracy on a test directory. Keras is timed through a compiled ``tf.function``
(never ``model.predict()``, which is reported once, at batch 1, to show why). A backbone or backend that fails
becomes a row with an ``error``; the sweep goes on.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.benchmarks.measure import time_steps
from transferkit.core.backbones import Backbone, published_table
from transferkit.core.errors import TransferkitError, UsageError
from transferkit.core.manifest import RUNTIME_BACKENDS

ALL_BACKENDS = ("keras", *RUNTIME_BACKENDS)
SWEEP_CLASSES = 10
Log = Callable[[str], None]
# Library default: log records; the `transferkit bench` command decides what the user sees (it passes print).
logger = logging.getLogger("transferkit.benchmarks")


@dataclass
class BenchSettings:
    batch_sizes: list[int]
    backends: list[str]
    device: str = "cpu"
    warmup: int = 3
    repeats: int = 10
    threads: int | None = None
    image_size: int | None = None  # None: each backbone's default size

    def validate(self) -> None:
        unknown = [b for b in self.backends if b not in ALL_BACKENDS]
        if unknown or not self.backends:
            raise UsageError(f"--backends: unknown {', '.join(unknown) or '(empty)'}; choose from "
                             f"{', '.join(ALL_BACKENDS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UsageError("--batch-sizes must be positive integers, e.g. 1,32")
        if self.repeats < 1 or self.warmup < 0:
            raise UsageError("--repeats must be >= 1 and --warmup >= 0")
        if self.device not in ("cpu", "gpu", "auto"):
            raise UsageError("--device must be cpu, gpu or auto")


@dataclass
class Row:
    model: str
    backend: str
    input_size: int
    parameters: int | None = None
    depth: int | None = None
    size_mb: float | None = None
    provider: str | None = None
    latency: dict[int, dict[str, float]] = field(default_factory=dict)  # batch size -> timing
    images_per_s: dict[int, float] = field(default_factory=dict)
    speedup_vs_keras: dict[int, float] = field(default_factory=dict)
    accuracy: float | None = None
    top5_accuracy: float | None = None
    predict_b1_ms: float | None = None  # keras model.predict() at batch 1, once, for contrast
    published_params: int | None = None
    error: str | None = None


def _error_text(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, TransferkitError) else f"{type(exc).__name__}: {text}"[:300]


def _measure(row: Row, predict: Callable[[np.ndarray], np.ndarray], settings: BenchSettings) -> None:
    rng = np.random.default_rng(0)
    for batch in settings.batch_sizes:
        x = rng.uniform(0, 255, (batch, row.input_size, row.input_size, 3)).astype(np.float32)
        timing = time_steps(lambda x=x: predict(x), settings.warmup, settings.repeats)
        row.latency[batch] = timing
        row.images_per_s[batch] = batch / (timing["median_ms"] / 1000)


def _keras_predictor(model, size: int, device: str):
    import tensorflow as tf

    from transferkit.training.evaluate import make_forward

    forward = make_forward(model, (size, size, 3))
    name = "/GPU:0" if device != "cpu" and tf.config.list_physical_devices("GPU") else "/CPU:0"

    def predict(x: np.ndarray) -> np.ndarray:
        with tf.device(name):
            return forward(tf.constant(x)).numpy()

    return predict, f"TF:{name[1:4]}"


def _depth(model) -> int:
    """Layers of the backbone (the keras.io table counts layers likewise, activations and normalisation included)."""
    from transferkit.training.model import find_backbone_layer

    return len(find_backbone_layer(model).layers)


def _fill_speedups(rows: list[Row]) -> None:
    keras = {r.model: r for r in rows if r.backend == "keras" and not r.error}
    for row in rows:
        base = keras.get(row.model)
        if base is None or row.error:
            continue
        for batch, ips in row.images_per_s.items():
            if batch in base.images_per_s:
                row.speedup_vs_keras[batch] = ips / base.images_per_s[batch]


def sweep_backbone(backbone: Backbone, settings: BenchSettings, work_dir: Path, log: Log,
                   keep_bundle: Path | None = None) -> list[Row]:
    """Build, export and time one backbone on every requested backend."""
    from transferkit.core.predictors import load_bundle
    from transferkit.training.config import HeadConfig
    from transferkit.training.model import build_classifier

    size = settings.image_size or backbone.default_size
    published = published_table().get(backbone.name)
    base_row = dict(model=backbone.name, input_size=size,
                    published_params=published.parameters if published else None)
    try:
        if size < backbone.min_size:
            raise UsageError(f"{backbone.name} needs at least {backbone.min_size} px, got {size}")
        model = build_classifier(backbone, SWEEP_CLASSES, size, "none", HeadConfig(dropout=0.0))
        params, depth = int(model.count_params()), _depth(model)
    except Exception as exc:
        return [Row(backend=b, error=_error_text(exc), **base_row) for b in settings.backends]
    rows = []
    if "keras" in settings.backends:
        rows.append(_sweep_keras_row(model, settings, work_dir / f"{backbone.name}.keras",
                                     dict(parameters=params, depth=depth, **base_row)))
    backends = [b for b in settings.backends if b != "keras"]
    if not backends:
        return rows
    bundle_dir = keep_bundle or work_dir / backbone.name
    try:
        _export_sweep_model(model, backbone.name, size, backends, bundle_dir, log)
        bundle = load_bundle(bundle_dir)
    except Exception as exc:
        return rows + [Row(backend=b, error=_error_text(exc), parameters=params, depth=depth, **base_row)
                       for b in backends]
    return rows + [time_bundle_backend(bundle, b, settings, params, depth, base_row) for b in backends]


def _sweep_keras_row(model, settings: BenchSettings, path: Path, fields: dict) -> Row:
    """The Keras row of a sweep: the saved file's size, the timings, and model.predict() at batch 1 for contrast."""
    row = Row(backend="keras", **fields)
    try:
        model.save(path)
        row.size_mb = path.stat().st_size / 1e6
        _time_keras(row, model, settings)
        x = np.zeros((1, row.input_size, row.input_size, 3), np.float32)
        model.predict(x, verbose=0)  # first call builds the predict function
        start = time.perf_counter()
        model.predict(x, verbose=0)
        row.predict_b1_ms = (time.perf_counter() - start) * 1000
    except Exception as exc:
        row.error = _error_text(exc)
    return row


def _time_keras(row: Row, model, settings: BenchSettings, images: np.ndarray | None = None,
                labels: np.ndarray | None = None) -> None:
    """The Keras model's timings through a compiled tf.function, and its accuracy when ``images`` and ``labels``
    are given."""
    predict, row.provider = _keras_predictor(model, row.input_size, settings.device)
    _measure(row, predict, settings)
    if images is not None and labels is not None:
        row.accuracy, row.top5_accuracy = _accuracy(_probabilities(predict, images), labels)


def _export_sweep_model(model, name: str, size: int, backends: list[str], bundle_dir: Path, log: Log) -> None:
    """Export the untrained sweep model through the real export stage, in the files ``backends`` run; random
    pixels stand in for validation and calibration images, and the accuracy gate cannot apply."""
    from transferkit.export.bundle import ValidationImages, export_model

    formats = list(dict.fromkeys(RUNTIME_BACKENDS[b].format for b in backends))
    images = np.random.default_rng(0).integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    log(f"  exporting {name} ({', '.join(formats)})")
    export_model(model, out=bundle_dir, backbone=name, image_size=size,
                 class_names=[f"class_{i}" for i in range(SWEEP_CLASSES)],
                 validation=ValidationImages(images, None, "random pixels (untrained sweep model)"),
                 calibration=images, formats=formats, name=f"bench-{name}", register=False,
                 allow_mismatch=True, force=True, log=lambda line: None)


def time_bundle_backend(bundle, backend: str, settings: BenchSettings, params: int | None, depth: int | None,
                        base_row: dict, images: np.ndarray | None = None, labels: np.ndarray | None = None) -> Row:
    row = Row(backend=backend, parameters=params, depth=depth, **base_row)
    try:
        entry = bundle.manifest.formats[RUNTIME_BACKENDS[backend].format]
        row.size_mb = entry.bytes / 1e6
        predictor = bundle.predictor(backend, settings.device, settings.threads)
        row.provider = predictor.provider
        _measure(row, predictor, settings)
        if images is not None and labels is not None:
            row.accuracy, row.top5_accuracy = _accuracy(_probabilities(predictor, images), labels)
    except Exception as exc:
        row.error = _error_text(exc)
    return row


def _probabilities(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    return np.concatenate([predict(images[i : i + 32].astype(np.float32)) for i in range(0, len(images), 32)])


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float | None]:
    """Top-1 and top-5 accuracy (None with 5 classes or fewer, where it is always 1). Not
    transferkit.core.metrics.classification_metrics: that needs scikit-learn, and `bench --bundles` runs in the base
    install, which has none."""
    top1 = float(np.mean(probabilities.argmax(1) == labels))
    if probabilities.shape[1] <= 5:
        return top1, None
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    return top1, float(np.mean([label in row for label, row in zip(labels, top5)]))


def run_sweep(backbones: list[Backbone], settings: BenchSettings, log: Log = logger.info,
              keep_bundles: Path | None = None, progress: Callable[[int, int, str], None] | None = None,
              ) -> list[Row]:
    settings.validate()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="transferkit-bench-") as tmp:
        for index, backbone in enumerate(backbones):
            if progress:
                progress(index, len(backbones), backbone.name)
            keep = keep_bundles / backbone.name if keep_bundles else None
            rows += sweep_backbone(backbone, settings, Path(tmp), log, keep)
            _release_keras_memory()
        if progress:
            progress(len(backbones), len(backbones), "done")
    _fill_speedups(rows)
    return rows


def _release_keras_memory() -> None:
    import gc

    import keras

    keras.backend.clear_session()
    gc.collect()


def run_bundles(sources: list[str], data: Path, settings: BenchSettings, log: Log = logger.info,
                progress: Callable[[int, int, str], None] | None = None) -> list[Row]:
    """Time trained bundles and measure their accuracy on a class-folder test directory."""
    from transferkit.core.predictors import load_bundle

    settings.validate()
    if not Path(data).is_dir():
        raise UsageError(f"--data {data}: not a directory of class folders")
    rows: list[Row] = []
    for index, source in enumerate(sources):
        if progress:
            progress(index, len(sources), source)
        rows += _bundle_rows(load_bundle(source), Path(data), settings)
    if progress:
        progress(len(sources), len(sources), "done")
    _fill_speedups(rows)
    return rows


def _bundle_rows(bundle, data: Path, settings: BenchSettings) -> list[Row]:
    """One bundle's row per requested backend: timings and accuracy on ``data``'s images of its classes."""
    manifest = bundle.manifest
    images, labels = _labelled_images(data, manifest.class_names, manifest.image_size, manifest.name)
    base_row = dict(model=f"{manifest.name} ({manifest.backbone})", input_size=manifest.image_size)
    keras_model = _run_model(manifest)
    params = depth = None
    if keras_model is not None:
        params, depth = int(keras_model.count_params()), _depth(keras_model)
    rows = []
    for backend in sorted(settings.backends, key=lambda b: b != "keras"):  # Keras first, as in a sweep
        row = Row(backend=backend, parameters=params, depth=depth, **base_row)
        if backend == "keras" and keras_model is None:
            row.error = "the bundle's training run (model.keras) is not on this machine, or Keras is not installed"
        elif backend == "keras":
            try:
                _time_keras(row, keras_model, settings, images, labels)
            except Exception as exc:
                row.error = _error_text(exc)
        elif RUNTIME_BACKENDS[backend].format not in manifest.formats:
            row = Row(backend=backend, error=f"not in this bundle (it has {', '.join(manifest.formats)})",
                      **base_row)
        else:
            row = time_bundle_backend(bundle, backend, settings, params, depth, base_row, images, labels)
        rows.append(row)
    return rows


def _labelled_images(data: Path, class_names: list[str], size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images of ``data/<class>/`` for each of the bundle's classes, and their class indices."""
    from transferkit.core.images import SUPPORTED_EXTENSIONS, decode_image

    files, labels = [], []
    for label, class_name in enumerate(class_names):
        folder = data / class_name
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUPPORTED_EXTENSIONS)
            files += found
            labels += [label] * len(found)
    if not files:
        raise UsageError(f"--data {data} has no folders named after the classes of {name} "
                         f"({', '.join(class_names[:5])}...)")
    return np.stack([decode_image(f, size) for f in files]), np.array(labels)


def _run_model(manifest):
    """The bundle's Keras model from its training run, where the run is on this machine and Keras is installed (the
    base install times bundles without it)."""
    import importlib.util

    run_dir = manifest.training.get("run_dir")
    if not run_dir or not (Path(run_dir) / "model.keras").is_file() or importlib.util.find_spec("keras") is None:
        return None
    from transferkit.training.model import load_run_model

    return load_run_model(Path(run_dir))
