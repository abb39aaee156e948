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
    from transferkit.export.bundle import ValidationImages, export_model
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
        row = Row(backend="keras", parameters=params, depth=depth, **base_row)
        try:
            keras_path = work_dir / f"{backbone.name}.keras"
            model.save(keras_path)
            row.size_mb = keras_path.stat().st_size / 1e6
            predict, row.provider = _keras_predictor(model, size, settings.device)
            _measure(row, predict, settings)
            x = np.zeros((1, size, size, 3), np.float32)
            model.predict(x, verbose=0)  # first call builds the predict function
            start = time.perf_counter()
            model.predict(x, verbose=0)
            row.predict_b1_ms = (time.perf_counter() - start) * 1000
        except Exception as exc:
            row.error = _error_text(exc)
        rows.append(row)
    backends = [b for b in settings.backends if b != "keras"]
    if not backends:
        return rows
    formats = list(dict.fromkeys(RUNTIME_BACKENDS[b].format for b in backends))  # the files those backends run
    bundle_dir = keep_bundle or work_dir / backbone.name
    try:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8)
        log(f"  exporting {backbone.name} ({', '.join(formats)})")
        export_model(model, out=bundle_dir, backbone=backbone.name, image_size=size,
                     class_names=[f"class_{i}" for i in range(SWEEP_CLASSES)],
                     validation=ValidationImages(images, None, "random pixels (untrained sweep model)"),
                     calibration=images, formats=formats, name=f"bench-{backbone.name}", register=False,
                     allow_mismatch=True, force=True, log=lambda line: None)
        bundle = load_bundle(bundle_dir)
    except Exception as exc:
        return rows + [Row(backend=b, error=_error_text(exc), parameters=params, depth=depth, **base_row)
                       for b in backends]
    for backend in backends:
        rows.append(time_bundle_backend(bundle, backend, settings, params, depth, base_row))
    return rows


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
            probabilities = np.concatenate([predictor(images[i : i + 32].astype(np.float32))
                                            for i in range(0, len(images), 32)])
            row.accuracy, row.top5_accuracy = _accuracy(probabilities, labels)
    except Exception as exc:
        row.error = _error_text(exc)
    return row


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float | None]:
    top1 = float(np.mean(probabilities.argmax(1) == labels))
    if probabilities.shape[1] <= 5:  # top-5 of 5 classes is always 1
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
    from transferkit.core.images import SUPPORTED_EXTENSIONS, decode_image
    from transferkit.core.predictors import load_bundle

    settings.validate()
    if not Path(data).is_dir():
        raise UsageError(f"--data {data}: not a directory of class folders")
    rows: list[Row] = []
    for index, source in enumerate(sources):
        if progress:
            progress(index, len(sources), source)
        bundle = load_bundle(source)
        manifest = bundle.manifest
        files, labels = [], []
        for label, name in enumerate(manifest.class_names):
            folder = Path(data) / name
            if folder.is_dir():
                found = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUPPORTED_EXTENSIONS)
                files += found
                labels += [label] * len(found)
        if not files:
            raise UsageError(f"--data {data} has no folders named after the classes of {manifest.name} "
                             f"({', '.join(manifest.class_names[:5])}...)")
        images = np.stack([decode_image(f, manifest.image_size) for f in files])
        labels_array = np.array(labels)
        base_row = dict(model=f"{manifest.name} ({manifest.backbone})", input_size=manifest.image_size)
        keras_model = _run_model(manifest)
        params = depth = None
        if keras_model is not None:
            params, depth = int(keras_model.count_params()), _depth(keras_model)
        if "keras" in settings.backends:
            row = Row(backend="keras", parameters=params, depth=depth, **base_row)
            if keras_model is None:
                row.error = "the bundle's training run (model.keras) is not on this machine, or Keras is not installed"
            else:
                try:
                    predict, row.provider = _keras_predictor(keras_model, manifest.image_size, settings.device)
                    _measure(row, predict, settings)
                    probabilities = np.concatenate([predict(images[i : i + 32].astype(np.float32))
                                                    for i in range(0, len(images), 32)])
                    row.accuracy, row.top5_accuracy = _accuracy(probabilities, labels_array)
                except Exception as exc:
                    row.error = _error_text(exc)
            rows.append(row)
        for backend in settings.backends:
            if backend == "keras":
                continue
            if RUNTIME_BACKENDS[backend].format not in manifest.formats:
                rows.append(Row(backend=backend, error=f"not in this bundle (it has {', '.join(manifest.formats)})",
                                **base_row))
                continue
            rows.append(time_bundle_backend(bundle, backend, settings, params, depth, base_row, images,
                                            labels_array))
    if progress:
        progress(len(sources), len(sources), "done")
    _fill_speedups(rows)
    return rows


def _run_model(manifest):
    """The bundle's Keras model from its training run, where the run is on this machine and Keras is installed (the
    base install times bundles without it)."""
    import importlib.util

    run_dir = manifest.training.get("run_dir")
    if not run_dir or not (Path(run_dir) / "model.keras").is_file() or importlib.util.find_spec("keras") is None:
        return None
    from transferkit.training.model import load_run_model

    return load_run_model(Path(run_dir))
