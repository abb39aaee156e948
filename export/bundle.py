"""Export a training run (or any transferkit classifier, or a Keras model file wrapped like one by
:mod:`transferkit.export.foreign`) as a validated bundle, atomically.

Order matters: every format is written into a hidden staging directory, validated against the Keras model, the
manifest is written, the bundle is registered in the BentoML model store, and only then is the staging directory
renamed into place. A failed gate, a conversion error, Ctrl-C or SIGTERM leaves no bundle and no store entry.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from transferkit.core.atomic import atomic_output_dir, check_output_dir
from transferkit.core.backbones import Backbone, get_backbone
from transferkit.core.errors import ExportValidationError, InvalidImageError, RunDirectoryError, UsageError
from transferkit.core.images import decode_image
from transferkit.core.manifest import (
    BACKENDS,
    FORMAT_FILES,
    FORMAT_PRECISION,
    MANIFEST_NAME,
    MODEL_CARD_NAME,
    DocumentEntry,
    ExplainInfo,
    FormatEntry,
    Manifest,
    ResizeRule,
    ValidationReport,
    sha256_path,
)
from transferkit.core.stopping import raise_if_stop_requested
from transferkit.core.store import register_bundle  # noqa: F401  (importable from here, as before)
from transferkit.core.system import library_versions
from transferkit.export.quantize import METHODS as INT8_METHODS
from transferkit.export.validate import MIN_IMAGES, engine_backends, validate_bundle
from transferkit.training.rundir import read_config, read_labels, read_metrics, split_files

logger = logging.getLogger(__name__)

DEFAULT_FORMATS = ("savedmodel", "onnx", "onnx-fp16")
MAX_VALIDATION_IMAGES = 512
CALIBRATION_IMAGES = 200
PREPROCESSING_TEXT = {
    "caffe": "RGB->BGR, minus the ImageNet mean (103.939, 116.779, 123.68), no scaling",
    "tf": "x / 127.5 - 1",
    "torch": "x / 255, minus mean (0.485, 0.456, 0.406), divided by std (0.229, 0.224, 0.225)",
    "builtin": "none outside the backbone: it rescales 0-255 input itself",
    # Modes of a Keras model file that transferkit did not train (export/foreign.py).
    "none": "none: the model takes RGB 0-255 as float32",
    "scale": "x / 255 (to [0, 1])",
}
# Optional progress callback (the CLI prints); without one, progress goes to this module's logger.
Log = Callable[[str], None]


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: Manifest
    tag: str | None  # BentoML model tag, when registered
    seconds: dict[str, float]


@dataclass
class ValidationImages:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray | None
    source: str


def parse_formats(spec: str) -> list[str]:
    formats = [item.strip().lower() for item in spec.split(",") if item.strip()]
    unknown = [f for f in formats if f not in BACKENDS]
    if unknown or not formats:
        raise UsageError(f"--formats {spec!r}: expected a comma-separated list of {', '.join(BACKENDS)}")
    return list(dict.fromkeys(formats))


def store_name(text: str) -> str:
    """A valid BentoML model name (lowercase letters, digits, '-', '_', '.'; starting and ending alphanumeric)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:63].strip("-._")
    if not name:
        raise UsageError(f"--name {text!r}: needs at least one letter or digit")
    return name


def _decode_files(files: list[Path], size: int) -> np.ndarray:
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise RunDirectoryError(
            f"the run's images are not at {missing[0].parent.parent} any more ({missing[0]} is missing); "
            f"pass --data DIR pointing at the dataset the run was trained on"
        )
    if not files:
        return np.zeros((0, size, size, 3), np.uint8)
    try:
        return np.stack([decode_image(f, size) for f in files])
    except InvalidImageError as exc:
        raise RunDirectoryError(f"a validation image of the run cannot be decoded: {exc}") from None


def stratified(items: list[tuple[Path, str]], count: int, seed: int | None = None) -> list[tuple[Path, str]]:
    """Up to ``count`` items taken round-robin across classes (every class equally, as far as it has items).

    ``seed`` shuffles within each class first (calibration); without it each class keeps the run's order.
    """
    by_class: dict[str, list[tuple[Path, str]]] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    if seed is not None:
        rng = np.random.default_rng(seed)
        by_class = {label: [group[i] for i in rng.permutation(len(group))] for label, group in by_class.items()}
    chosen: list[tuple[Path, str]] = []
    depth = 0
    while len(chosen) < count and any(depth < len(group) for group in by_class.values()):
        for label in sorted(by_class):
            if depth < len(by_class[label]) and len(chosen) < count:
                chosen.append(by_class[label][depth])
        depth += 1
    return chosen


def run_images(run_dir: Path, size: int, class_names: list[str], data_root: Path | None = None,
               ) -> tuple[ValidationImages, np.ndarray]:
    """Validation images and calibration images of a run.

    Validation: the test split, topped up from val, then train, to at least 64 images; at most 512, taken evenly
    across classes (with 100 classes, every class is checked, not the first third of a sorted list).
    Calibration (int8): up to 200 training images, evenly across classes, seeded.
    """
    splits = {name: split_files(run_dir, name, data_root) for name in ("test", "val", "train")}
    chosen: list[tuple[Path, str]] = []
    used = []
    for name in ("test", "val", "train"):
        if len(chosen) >= MIN_IMAGES and used:
            break
        if splits[name]:
            chosen += stratified(splits[name], MAX_VALIDATION_IMAGES - len(chosen))
            used.append(name)
    if not chosen:
        raise RunDirectoryError(f"{run_dir}/split.json lists no images to validate the export on")
    unknown = sorted({label for _, label in chosen} - set(class_names))
    if unknown:
        raise RunDirectoryError(f"{run_dir}: split.json has labels that labels.json lacks: {', '.join(unknown)}")
    images = _decode_files([path for path, _ in chosen], size)
    labels = np.array([class_names.index(label) for _, label in chosen])
    calibration = _decode_files([path for path, _ in stratified(splits["train"], CALIBRATION_IMAGES, seed=0)], size)
    return ValidationImages(images, labels, "+".join(used)), calibration


def resize_rule() -> ResizeRule:
    """What :func:`transferkit.core.images.decode_image` does, with the Pillow version that does it."""
    return ResizeRule(library_version=importlib.metadata.version("pillow"))


def _format_entry(bundle_dir: Path, name: str, opset: int, quantization: dict | None = None,
                  cam_output: str | None = None) -> FormatEntry:
    from transferkit.export.convert import INPUT_DTYPE, INPUT_NAME, OUTPUT_NAME

    digest, size, count = sha256_path(bundle_dir / FORMAT_FILES[name])
    return FormatEntry(file=FORMAT_FILES[name], sha256=digest, bytes=size, files=count, input_name=INPUT_NAME,
                       input_dtype=INPUT_DTYPE, output_name=OUTPUT_NAME, precision=FORMAT_PRECISION[name],
                       opset=None if name == "savedmodel" else opset, quantization=quantization,
                       cam_output=cam_output)


def _delete_store_entry(tag: str) -> None:
    import bentoml

    try:
        bentoml.models.delete(tag)
    except Exception:  # best effort on the way out of a failure; the original error is what the user needs
        logger.warning("could not remove %s from the BentoML model store", tag)


def _row_and_mode(backbone: str | Backbone, preprocessing: str | None) -> tuple[Backbone, str]:
    row = backbone if isinstance(backbone, Backbone) else get_backbone(backbone)
    mode = preprocessing or row.preprocessing
    if mode not in PREPROCESSING_TEXT:
        raise UsageError(f"unknown preprocessing mode {mode!r}; expected one of {', '.join(PREPROCESSING_TEXT)}")
    return row, mode


def export_model(
    model,
    *,
    out: Path,
    backbone: str | Backbone,
    image_size: int,
    class_names: list[str],
    validation: ValidationImages,
    calibration: np.ndarray | None = None,
    formats: list[str] | tuple[str, ...] = DEFAULT_FORMATS,
    opset: int = 17,
    name: str | None = None,
    training: dict | None = None,
    register: bool = True,
    allow_mismatch: bool = False,
    force: bool = False,
    log: Log | None = None,
    preprocessing: str | None = None,
    int8_method: str = "minmax",
) -> ExportResult:
    """Write, validate, describe and register a bundle for a transferkit classifier (see the module docstring).

    ``backbone`` is a registry name, or a row describing a model outside the registry (a Keras file transferkit did
    not train, export/foreign.py); ``preprocessing`` (a key of :data:`PREPROCESSING_TEXT`) then says what the
    model's graph does to the pixels, by default the row's mode.
    ``validation.images`` and ``calibration`` are uint8 pixels from the decoder. Progress goes to ``log`` if given,
    else to this module's logger; the validation table is logged too (a failing gate raises after logging it).
    """
    log = log or logger.info
    row, mode = _row_and_mode(backbone, preprocessing)  # an unknown name fails before the slow part
    formats = list(formats)
    if "onnx-int8" in formats and (calibration is None or len(calibration) == 0):
        raise UsageError("onnx-int8 needs calibration images (the run's training split)")
    if int8_method not in INT8_METHODS:
        raise UsageError(f"--int8-calibration {int8_method!r}: choose one of {', '.join(INT8_METHODS)}")
    name = store_name(name or f"{row.name}-{out.name}")
    check_output_dir(out, force)
    cam, explain = _explain_info(model, log)
    seconds: dict[str, float] = {}
    tag = None
    try:
        with atomic_output_dir(out, force) as staging:
            written = _write_formats(model, staging, formats, image_size, opset, calibration, log, class_names,
                                     int8_method, cam)
            seconds.update(written.seconds)
            entries = {fmt: _format_entry(staging, fmt, opset, written.quantization.get(fmt), explain.output)
                       for fmt in BACKENDS if fmt in formats}
            start = time.perf_counter()
            report = _validate(model, staging, entries, validation, row.name, cam)
            seconds["validation"] = round(time.perf_counter() - start, 2)
            if "onnx" not in formats:  # written only as the source of fp16/int8
                (staging / FORMAT_FILES["onnx"]).unlink(missing_ok=True)
            _check_report(report, entries, allow_mismatch, log)
            from transferkit.export.card import model_card

            card = staging / MODEL_CARD_NAME
            card.write_text(model_card(name, row, image_size, class_names, PREPROCESSING_TEXT[mode],
                                       training or {}, report, list(entries), explain), encoding="utf-8")
            digest, size, _ = sha256_path(card)
            documents = {"model_card": DocumentEntry(file=MODEL_CARD_NAME, sha256=digest, bytes=size)}
            manifest = _manifest(name, row, image_size, class_names, entries, training, report, documents, mode,
                                 explain)
            (staging / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
            raise_if_stop_requested()
            if register:
                log("registering in the BentoML model store")
                tag = register_bundle(staging, manifest)
    except BaseException:
        if tag:  # registered, then stopped before the bundle was published: the entry goes too
            _delete_store_entry(tag)
        raise
    return ExportResult(bundle_dir=Path(out).absolute(), manifest=manifest, tag=tag, seconds=seconds)


def _explain_info(model, log: Log) -> tuple:
    """(where the class activation map comes from or None, the manifest's record of it), logged either way."""
    from transferkit.export.convert import CAM_OUTPUT_NAME
    from transferkit.training.cam import find_cam

    cam, reason = find_cam(model)
    if cam is None:
        log(f"no class activation map: {reason}")
        return None, ExplainInfo(available=False, reason=reason)
    log(f"class activation map of the top class: output {CAM_OUTPUT_NAME!r}, {cam.resolution[0]}x{cam.resolution[1]} "
        f"(the feature map's resolution)")
    return cam, ExplainInfo(available=True, output=CAM_OUTPUT_NAME, resolution=list(cam.resolution))


@dataclass
class Written:
    seconds: dict[str, float] = field(default_factory=dict)  # per format
    quantization: dict[str, dict] = field(default_factory=dict)  # how the int8 file was made (export/quantize.py)


def _write_formats(model, staging: Path, formats: list[str], image_size: int, opset: int,
                   calibration: np.ndarray | None, log: Log, class_names: list[str] | None = None,
                   int8_method: str = "minmax", cam=None) -> Written:
    """Write each of ``formats`` into ``staging`` (ONNX too when fp16 or int8 is asked for: their source), and
    record ``class_names`` in every ONNX file's metadata (before any checksum is taken)."""
    from transferkit.export import convert
    from transferkit.export.quantize import write_onnx_int8

    written = Written()

    onnx_path = staging / FORMAT_FILES["onnx"]
    writers = {
        "savedmodel": lambda: convert.write_saved_model(model, image_size, staging / "saved_model", cam),
        "onnx": lambda: convert.write_onnx(model, image_size, onnx_path, opset, cam),
        "onnx-fp16": lambda: convert.write_onnx_fp16(onnx_path, staging / FORMAT_FILES["onnx-fp16"]),
        "onnx-int8": lambda: written.quantization.setdefault("onnx-int8", write_onnx_int8(
            onnx_path, staging / FORMAT_FILES["onnx-int8"], calibration, int8_method).describe()),
    }
    onnx_needed = any(f.startswith("onnx") for f in formats)
    for fmt, write in writers.items():
        if fmt in formats or (fmt == "onnx" and onnx_needed):
            log(f"writing {fmt} ({FORMAT_FILES[fmt]})")
            start = time.perf_counter()
            write()
            raise_if_stop_requested()  # tf2onnx's garbage collection can swallow a SIGTERM (core/stopping.py)
            written.seconds[fmt] = round(time.perf_counter() - start, 2)
    if class_names is not None:
        for fmt in writers:
            if fmt.startswith("onnx") and (staging / FORMAT_FILES[fmt]).is_file():
                convert.label_onnx(staging / FORMAT_FILES[fmt], class_names)
    return written


def _validate(model, staging: Path, entries: dict[str, FormatEntry], validation: ValidationImages,
              backbone: str, cam=None) -> ValidationReport:
    """Every written format, and the OpenVINO backends this CPU runs, against the Keras model's answers (and its
    class activation maps, where the graphs compute them)."""
    import tensorflow as tf

    from transferkit.training.cam import keras_maps
    from transferkit.training.evaluate import batched_forward

    maps = None
    with tf.device("/CPU:0"):  # the reference; on a GPU, TF32 would blur the comparison
        if cam is None:
            reference = batched_forward(model, validation.images.astype(np.float32))
        else:
            reference, maps = keras_maps(cam, validation.images.astype(np.float32))
    return validate_bundle(staging, entries, reference, validation.images.astype(np.uint8), validation.labels,
                           validation.source, backbone, engine_backends(entries), maps)


def _check_report(report: ValidationReport, entries: dict[str, FormatEntry], allow_mismatch: bool, log: Log) -> None:
    """Log the validation table; raise when a written format failed its gate, unless ``allow_mismatch``."""
    log("validation report (near-ties: Keras top-1 margin <= 2 * the error bound; see the gate column)\n"
        + report.table())
    for checked in report.formats:
        if not checked.passed and checked.format not in entries:
            log(f"warning: {checked.format} failed its gate; that backend will refuse to load this bundle")
    if not report.passed and not allow_mismatch:
        failed = [f"{f.format}: {'; '.join(f.failures)}" for f in report.formats
                  if not f.passed and f.format in entries]
        raise ExportValidationError(
            "the exported model does not answer like the Keras model (" + " | ".join(failed)
            + "); nothing was written. --allow-mismatch publishes it anyway, recording the failure"
        )


def _manifest(name: str, row: Backbone, image_size: int, class_names: list[str], entries: dict[str, FormatEntry],
              training: dict | None, report: ValidationReport,
              documents: dict[str, DocumentEntry] | None = None, mode: str | None = None,
              explain: ExplainInfo | None = None) -> Manifest:
    """The bundle's manifest; its version is the time and a digest of every file's checksum."""
    from transferkit.export.convert import INPUT_DTYPE, INPUT_NAME, OUTPUT_NAME

    created = datetime.now(UTC)
    calibration_record = (training or {}).get("calibration")
    calibrated = bool(calibration_record and calibration_record.get("applied"))
    mode = mode or row.preprocessing
    combined = "".join(entries[f].sha256 for f in sorted(entries))
    version = f"{created:%Y%m%d-%H%M%S}-{hashlib.sha256(combined.encode()).hexdigest()[:8]}"
    return Manifest(
        name=name, version=version, created=created, backbone=row.name, family=row.family,
        image_size=image_size, class_names=list(class_names),
        preprocessing={"mode": mode, "in_graph": PREPROCESSING_TEXT[mode]},
        resize=resize_rule(),
        input={"name": INPUT_NAME, "dtype": INPUT_DTYPE, "shape": [None, image_size, image_size, 3],
               "range": "RGB 0-255", "decoder": "transferkit.core.images.decode_image (see resize)"},
        output={"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, len(class_names)],
                "meaning": "softmax probabilities, in class_names order"
                + (" (calibrated: temperature scaling folded into the model)" if calibrated else "")},
        formats=entries, training=training or {}, validation=report,
        validation_overridden=not report.passed, versions=library_versions(),
        documents=documents or {}, calibration=calibration_record, explain=explain,
    )


def export_run(
    run_dir: Path,
    out: Path,
    formats: list[str] | tuple[str, ...] = DEFAULT_FORMATS,
    opset: int = 17,
    name: str | None = None,
    register: bool = True,
    allow_mismatch: bool = False,
    force: bool = False,
    data_root: Path | None = None,
    log: Log | None = None,
    int8_method: str = "minmax",
) -> ExportResult:
    """Export the model of a training run directory; validation images come from the run's ``split.json``."""
    log = log or logger.info
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirectoryError(f"run directory {run_dir} does not exist")
    config = read_config(run_dir)
    class_names = read_labels(run_dir)
    metrics = read_metrics(run_dir)
    # Before the slow part; --force never replaces the run itself or its dataset.
    inputs = [run_dir, *([data_root] if data_root else []), *([Path(config.data)] if config.data else [])]
    check_output_dir(out, force, protected=inputs)
    size = config.image_size
    log(f"reading validation images of {run_dir.name}")
    validation, calibration = run_images(run_dir, size, class_names, data_root)

    from transferkit.training.model import load_run_model

    log(f"loading {run_dir / 'model.keras'}")
    model = load_run_model(run_dir)
    test = metrics.test.model_dump(include={"accuracy", "top5_accuracy", "loss", "samples", "ece", "nll"},
                                   exclude_none=True) if metrics.test else {}
    training = {
        "run_dir": str(run_dir.absolute()),
        "strategy": config.strategy,
        "weights": config.weights_resolved,
        "test": test,
        "val": metrics.val.model_dump() if metrics.val else {},
        "diagnosis": (metrics.diagnosis or {}).get("verdict"),
        "counts": (metrics.data or {}).get("counts", {}),
        "preprocessing": config.preprocessing,
    }
    if metrics.calibration is not None:
        training["calibration"] = metrics.calibration.model_dump(mode="json")
    return export_model(
        model, out=Path(out), backbone=config.backbone, image_size=size, class_names=class_names,
        validation=validation, calibration=calibration, formats=formats, opset=opset,
        name=name or run_dir.name, training=training, register=register, allow_mismatch=allow_mismatch,
        force=force, log=log, int8_method=int8_method,
    )
