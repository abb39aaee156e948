"""Bundle a Keras model file that transferkit did not train: ``transferkit export MODEL.keras --data DIR``.

The model is loaded with ``safe_mode=True`` (a file holding Python code, such as a ``Lambda`` layer, is refused, not
run) and wrapped the way transferkit builds its own classifiers (training/model.py): input "image" (RGB 0-255,
float32) -> the declared preprocessing, from the same layers training uses (training/layers.py) -> the model ->
a softmax when the model returns logits. :func:`transferkit.export.bundle.export_model` then writes, validates,
describes and registers that wrapped model like any run's: the same uint8 input with the cast inside the graph, the
same gates (the wrapped Keras model is the reference), the same manifest, with ``backbone`` "custom".

What a run directory records, the flags say here: class names (``--labels``, default the sorted folder names of
``--data``, as training names them), input size (``--image-size``, default the model's input shape) and what the
model expects of its pixels (``--preprocessing``). Nothing in the file tells whether its outputs are logits, so by
default the rows are checked on the validation images: non-negative and summing to 1 means probabilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.core.backbones import Backbone, get_backbone
from transferkit.core.errors import InvalidImageError, UsageError
from transferkit.core.images import decode_image
from transferkit.core.manifest import sha256_path
from transferkit.export.bundle import (
    CALIBRATION_IMAGES,
    DEFAULT_FORMATS,
    MAX_VALIDATION_IMAGES,
    ExportResult,
    Log,
    ValidationImages,
    export_model,
    logger,
    stratified,
)
from transferkit.export.card import FOREIGN_SOURCE
from transferkit.export.validate import MIN_IMAGES

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
PREPROCESSING_MODES = ("none", "scale", "tf", "caffe", "torch")
OUTPUT_KINDS = ("auto", "probabilities", "logits")
CUSTOM = "custom"  # the manifest's backbone and family: not a registry row, so no reader looks one up
SUM_TOLERANCE = 1e-3  # a float32 softmax row sums to 1 within ~1e-6; logits almost never land this close
DETECTION_IMAGES = 64


@dataclass(frozen=True)
class ForeignModel:
    """What the flags (or the model file) declare about a model transferkit did not train."""

    path: Path
    data: Path
    labels: Path | None = None
    image_size: int | None = None
    preprocessing: str = "none"
    outputs: str = "auto"


def is_model_file(path: Path) -> bool:
    """True for a path that names a Keras model file rather than a run directory."""
    return Path(path).suffix.lower() in MODEL_SUFFIXES and not Path(path).is_dir()


def resolve_preprocessing(spec: str) -> str:
    """``--preprocessing``: a mode of :data:`PREPROCESSING_MODES`, or a backbone of the registry, whose mode is used
    (a backbone that rescales inside itself, like EfficientNet, means "none")."""
    lowered = spec.strip().lower()
    if lowered in PREPROCESSING_MODES:
        return lowered
    if lowered == "builtin":
        return "none"
    try:
        mode = get_backbone(spec.strip()).preprocessing
    except UsageError:
        raise UsageError(f"--preprocessing {spec!r}: expected one of {', '.join(PREPROCESSING_MODES)} or a "
                         "keras.applications backbone name (e.g. MobileNetV2, ResNet50, EfficientNetB0)") from None
    return "none" if mode == "builtin" else mode


def read_label_file(path: Path) -> list[str]:
    """``--labels``: a JSON list of distinct class names, in the order of the model's outputs."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--labels {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--labels {path} is not valid JSON ({exc})") from None
    if (not isinstance(data, list) or not data or not all(isinstance(x, str) and x for x in data)
            or len(set(data)) != len(data)):
        raise UsageError(f"--labels {path} must be a JSON list of distinct class names (strings), in the order of "
                         'the model\'s outputs, e.g. ["cat", "dog"]')
    return data


def data_items(root: Path) -> tuple[dict[str, list[tuple[Path, str]]], list[str]]:
    """(``{split: [(file, class)]}``, sorted class folder names) of ``--data``: discovered by training's rules (hidden
    files skipped, image extensions only; a pre-split train/val/test layout too; split "all" for class folders)."""
    from transferkit.training.data import _class_names, _discover, check_data_dir

    root = check_data_dir(Path(root))
    _, per_split, _ = _discover(root)
    folders = _class_names(root, per_split)
    items = {split: [(path, label) for label, paths in sorted(classes.items()) for path in paths]
             for split, classes in per_split.items()}
    return items, folders


def load_keras_file(path: Path):
    """The model in ``path``, loaded with ``safe_mode=True``; any failure is one readable :class:`UsageError`."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"model file not found: {path}")
    try:
        # safe_mode=True (the project's policy, and Keras's default, stated so it is never dropped): a file holding
        # Python code (a Lambda layer) is refused instead of running that code.
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError, TypeError, OSError, zipfile errors... for a bad file
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            raise UsageError(f"{path} holds Python code (a Lambda layer or similar), which transferkit does not run "
                             "(keras safe_mode); rebuild the model from built-in or registered layers") from None
        raise UsageError(f"{path} cannot be loaded as a Keras model: {text[:300]}") from None
    if not isinstance(model, keras.Model):
        raise UsageError(f"{path} holds a {type(model).__name__}, not a Keras model")
    return model


def model_geometry(model, image_size: int | None) -> tuple[int, int]:
    """(input size, output units) of a one-image-in, one-vector-out model; ``image_size`` (``--image-size``) is
    needed where the model's input size is not fixed, and must agree with it where it is."""
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
        raise UsageError(f"model {model.name!r} must have one image input and one output (a subclassed or "
                         "multi-input/output model cannot be bundled; save a functional or Sequential model)")
    shape, out = tuple(inputs[0].shape), tuple(outputs[0].shape)
    if len(shape) != 4 or shape[-1] not in (3, None):
        raise UsageError(f"model {model.name!r} takes input shape {list(shape)}; a bundle feeds RGB images "
                         "[N, H, W, 3] (channels last)")
    if shape[1] is not None and shape[2] is not None and shape[1] != shape[2]:
        raise UsageError(f"model {model.name!r} takes {shape[2]}x{shape[1]} images; bundles take square images")
    declared = shape[1] or shape[2]
    if image_size is None and declared is None:
        raise UsageError(f"model {model.name!r} does not fix its input size ({list(shape)}): pass --image-size N")
    if image_size is not None and declared is not None and image_size != declared:
        raise UsageError(f"--image-size {image_size}: model {model.name!r} takes {declared}x{declared} images")
    if len(out) != 2 or out[-1] is None:
        raise UsageError(f"model {model.name!r} returns shape {list(out)}; a classifier returns [N, classes]")
    return int(image_size or declared), int(out[-1])


def check_label_count(class_names: list[str], units: int, where: str) -> None:
    if len(class_names) == units:
        return
    hint = (" (one sigmoid unit is a binary model; bundles return one probability per class: rebuild its last "
            "layer as Dense(2, softmax))" if units == 1 else "")
    raise UsageError(f"{len(class_names)} class names ({where}) but the model has {units} outputs{hint}")


def _decode_readable(items: list[tuple[Path, str]], size: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Pixels and class names of the files that decode; the others are skipped and named (training does the same
    with a dataset's broken files), so one corrupt photo does not stop an export."""
    pixels, labels, skipped = [], [], []
    for path, label in items:
        try:
            pixels.append(decode_image(path, size))
        except (InvalidImageError, OSError) as exc:  # OSError: unreadable (permissions, a vanished file)
            skipped.append(f"{path}: {exc}")
        else:
            labels.append(label)
    array = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return array, labels, skipped


def data_images(items: dict[str, list[tuple[Path, str]]], size: int, class_names: list[str], int8: bool,
                log: Log) -> tuple[ValidationImages, np.ndarray | None]:
    """Validation images of ``--data``, evenly across classes as for a run (at most 512; a pre-split layout's test,
    then val, then train, to at least 64), and, for int8, calibration images (train, else the same pool)."""
    chosen: list[tuple[Path, str]] = []
    used: list[str] = []
    for split in ("test", "val", "all", "train"):
        if len(chosen) >= MIN_IMAGES and used:
            break
        if items.get(split):
            chosen += stratified(items[split], MAX_VALIDATION_IMAGES - len(chosen))
            used.append(split)
    images, labels, skipped = _decode_readable(chosen, size)
    if skipped:
        log(f"warning: skipped {len(skipped)} undecodable image(s) of --data, e.g. {skipped[0]}")
    if len(images) == 0:
        raise UsageError("--data: none of its images could be decoded")
    if len(images) < MIN_IMAGES:
        log(f"warning: only {len(images)} validation images in --data; the gates are weak below {MIN_IMAGES}")
    validation = ValidationImages(images, np.array([class_names.index(label) for label in labels]),
                                  "+".join("data" if s == "all" else f"data/{s}" for s in used))
    calibration = None
    if int8:
        pool = items.get("train") or items.get("all") or chosen
        calibration, _, _ = _decode_readable(stratified(pool, CALIBRATION_IMAGES, seed=0), size)
    return validation, calibration


def preprocessing_layer(mode: str):
    """The pixels' preprocessing as standard Keras layers: training's block for tf/caffe/torch (one definition of
    each mode in the project), an identity for "none", x/255 for "scale"."""
    import keras

    from transferkit.training.layers import preprocessing_block

    # A name no user model is likely to carry: Keras refuses two layers of one name in the wrapping model.
    name = "transferkit_preprocessing"
    if mode != "scale":
        return preprocessing_block("builtin" if mode == "none" else mode, name=name)
    block = keras.Sequential([keras.layers.Rescaling(1 / 255, dtype="float32", name=f"{name}_scale")], name=name)
    block.build((None, None, None, 3))
    return block


def wrap_model(model, image_size: int, mode: str, logits: bool):
    """image (RGB 0-255, float32) -> preprocessing -> ``model`` -> softmax if ``logits``: the shape of a transferkit
    classifier, which every writer and the validation take as the Keras reference."""
    import keras

    inputs = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
    scores = model(preprocessing_layer(mode)(inputs), training=False)
    if logits:
        scores = keras.layers.Softmax(dtype="float32", name="transferkit_softmax")(scores)
    return keras.Model(inputs, scores, name=f"{model.name}_bundled")


def output_kind(wrapped, images: np.ndarray, requested: str, log: Log) -> str:
    """"probabilities" or "logits": ``requested``, checked against the rows the model returns on ``images`` (the
    manifest promises softmax probabilities, so a claim the outputs contradict is refused)."""
    rows = np.asarray(wrapped(images[:DETECTION_IMAGES].astype(np.float32), training=False), dtype=np.float64)
    sums = rows.sum(axis=1)
    normalised = bool((rows >= -1e-6).all() and np.abs(sums - 1).max() <= SUM_TOLERANCE)
    evidence = (f"rows sum to {sums.min():.4g}..{sums.max():.4g}, min value {rows.min():.4g}, "
                f"on {len(rows)} --data images")
    if requested == "probabilities" and not normalised:
        raise UsageError(f"--outputs probabilities: the model's outputs are not probabilities ({evidence}); "
                         "pass --outputs logits to append a softmax")
    if requested == "logits" and normalised:
        log(f"warning: --outputs logits, but the outputs look like probabilities already ({evidence}); a softmax "
            "over probabilities flattens the scores")
    kind = requested if requested != "auto" else ("probabilities" if normalised else "logits")
    if requested == "auto":
        log(f"outputs: {kind} ({evidence})" + ("; appending a softmax" if kind == "logits" else ""))
    return kind


def _training_record(spec: ForeignModel, model, kind: str) -> dict:
    """The manifest's ``training`` entry: where the model came from, instead of a run's records."""
    digest, _, _ = sha256_path(spec.path)
    return {
        "source": FOREIGN_SOURCE,
        "trained_by": "not transferkit",
        "model_file": str(spec.path.absolute()),
        "model_sha256": digest,
        "model_name": model.name,
        "outputs": kind,
        "preprocessing": spec.preprocessing,
        "data": str(spec.data.absolute()),
    }


def export_foreign(
    spec: ForeignModel,
    out: Path,
    formats: list[str] | tuple[str, ...] = DEFAULT_FORMATS,
    opset: int = 17,
    name: str | None = None,
    register: bool = True,
    allow_mismatch: bool = False,
    force: bool = False,
    log: Log | None = None,
    int8_method: str = "minmax",
) -> ExportResult:
    """Export the Keras model file ``spec.path`` as a bundle, validated on the images of ``spec.data``."""
    from transferkit.core.atomic import check_output_dir

    log = log or logger.info
    mode = resolve_preprocessing(spec.preprocessing)
    if spec.outputs not in OUTPUT_KINDS:
        raise UsageError(f"--outputs {spec.outputs!r}: expected one of {', '.join(OUTPUT_KINDS)}")
    items, folders = data_items(spec.data)
    class_names = read_label_file(spec.labels) if spec.labels else folders
    # Before the slow part; --force never replaces the model file or the dataset.
    check_output_dir(out, force, protected=[spec.path, spec.data])
    log(f"loading {spec.path}")
    model = load_keras_file(spec.path)
    size, units = model_geometry(model, spec.image_size)
    check_label_count(class_names, units, f"--labels {spec.labels}" if spec.labels else
                      f"the class folders of --data {spec.data}")
    unknown = [folder for folder in folders if folder not in class_names]
    if unknown:  # validation labels come from the folder names: they must name the model's classes
        raise UsageError(f"--data {spec.data} has class folders that --labels {spec.labels} lacks: "
                         f"{', '.join(unknown[:5])}; the folder names must be class names of the model")
    missing = [label for label in class_names if label not in folders]
    if missing:
        log(f"warning: --data has no images of {len(missing)} class(es), e.g. {missing[0]}; they are not validated")
    log(f"reading validation images of {spec.data} at {size} px (preprocessing: {mode})")
    validation, calibration = data_images(items, size, class_names, "onnx-int8" in formats, log)

    from transferkit.training.model import float32_inference_model

    model = float32_inference_model(model)  # a mixed-precision model would otherwise export float16 compute
    kind = output_kind(wrap_model(model, size, mode, logits=False), validation.images, spec.outputs, log)
    wrapped = wrap_model(model, size, mode, logits=kind == "logits")
    # Not a registry row: it names the manifest's backbone/family; the mode comes from ``preprocessing=`` below.
    row = Backbone(name=CUSTOM, family=CUSTOM, default_size=size, min_size=1, preprocessing="builtin")
    return export_model(
        wrapped, out=Path(out), backbone=row, image_size=size, class_names=class_names, validation=validation,
        calibration=calibration, formats=formats, opset=opset, name=name or spec.path.stem,
        training=_training_record(spec, model, kind), register=register, allow_mismatch=allow_mismatch,
        force=force, log=log, preprocessing=mode, int8_method=int8_method,
    )
