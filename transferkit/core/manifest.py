"""The bundle contract: ``manifest.json``, written by export and read by the service, ``predict`` and benchmarks.

A bundle is a directory holding one model in several formats plus this manifest. Every format takes one named input
(RGB pixels 0-255, shape [N, H, W, 3], dynamic N, of the format's ``input_dtype``) and returns one named output (class
probabilities [N, C]); the cast to float32 and the backbone's preprocessing are inside the graph, so no reader needs
to know the backbone. The manifest records each file's sha256 so a loader can refuse a tampered or truncated model
before using it, and the resize rule as data so a consumer outside transferkit can reproduce the pixels.

Schema history: 1 - float32 input for every format, no resize rule; 2 - uint8 input (``FormatEntry.input_dtype``),
``resize``. Both are read; ``FormatEntry.input_dtype`` defaults to float32, which is what a schema-1 file means.

Pydantic only: no TensorFlow, no onnxruntime (the service reads manifests without either).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transferkit.core.errors import BundleError

SCHEMA_VERSION = 2
SUPPORTED_SCHEMAS: tuple[int, ...] = (1, 2)
MANIFEST_NAME = "manifest.json"

BACKENDS: tuple[str, ...] = ("savedmodel", "onnx", "onnx-fp16", "onnx-int8")
FORMAT_FILES: dict[str, str] = {
    "savedmodel": "saved_model",
    "onnx": "model.onnx",
    "onnx-fp16": "model.fp16.onnx",
    "onnx-int8": "model.int8.onnx",
}
FORMAT_PRECISION: dict[str, str] = {"savedmodel": "fp32", "onnx": "fp32", "onnx-fp16": "fp16", "onnx-int8": "int8"}


@dataclass(frozen=True)
class RuntimeBackend:
    """What ``--backend NAME`` runs: a bundle format (a file), the engine that runs it and the precision it computes
    in. The OpenVINO backends add no file: they run the bundle's ONNX files with OpenVINO's CPU plugin, bf16 on a
    CPU with a matrix engine (AMX or AVX-512 BF16), int8 from the QDQ file's quantization."""

    name: str
    format: str
    engine: Literal["tensorflow", "onnxruntime", "openvino"]
    precision: Literal["fp32", "fp16", "bf16", "int8"]


RUNTIME_BACKENDS: dict[str, RuntimeBackend] = {b.name: b for b in (
    RuntimeBackend("savedmodel", "savedmodel", "tensorflow", "fp32"),
    RuntimeBackend("onnx", "onnx", "onnxruntime", "fp32"),
    RuntimeBackend("onnx-fp16", "onnx-fp16", "onnxruntime", "fp16"),
    RuntimeBackend("onnx-int8", "onnx-int8", "onnxruntime", "int8"),
    RuntimeBackend("openvino", "onnx", "openvino", "fp32"),
    RuntimeBackend("openvino-bf16", "onnx", "openvino", "bf16"),
    RuntimeBackend("openvino-int8", "onnx-int8", "openvino", "int8"),
)}


class FormatEntry(BaseModel):
    """One exported file (or the SavedModel directory) and how to call it."""

    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: str  # of the file; for a directory, of its sorted (relative path, content hash) list
    bytes: int
    files: int = 1
    input_name: str
    output_name: str
    input_dtype: Literal["uint8", "float32"] = "float32"  # schema 1 wrote no dtype and meant float32
    output_dtype: Literal["float32"] = "float32"
    precision: Literal["fp32", "fp16", "int8"]
    opset: int | None = None


class JpegDownscale(BaseModel):
    """JPEG DCT pre-scaling (``Image.draft``) before the resize: the decoder itself reduces the image by a factor."""

    model_config = ConfigDict(extra="forbid")

    factors: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    # Pillow's JpegImageFile.draft: side = the larger target side; the decoded image is ceil(width / f) x
    # ceil(height / f), then resized with ``filter``.
    rule: str = "largest f in factors with f <= min(width // side, height // side)"


class ResizeRule(BaseModel):
    """How :func:`transferkit.core.images.decode_image` turns image bytes into the model's input pixels, as data a
    consumer outside transferkit (tf.image, cv2, a mobile app) can reproduce."""

    model_config = ConfigDict(extra="forbid")

    library: str = "pillow"
    library_version: str
    filter: Literal["bilinear"] = "bilinear"  # Image.Resampling.BILINEAR: support widened by the reduction factor
    mode: Literal["squash"] = "squash"  # to the square size, aspect ratio not kept, no crop
    jpeg_dct_downscale: JpegDownscale = Field(default_factory=JpegDownscale)
    exif_transpose: bool = True
    alpha: Literal["dropped"] = "dropped"  # convert("RGB"), not composited on a background
    frames: Literal["first"] = "first"
    high_bit_depth: str = "16-bit gray divided by 257, rounded; other modes through Pillow's convert('RGB')"
    output: str = "uint8 RGB [H, W, 3]"


class FormatValidation(BaseModel):
    """How one format answered compared with the Keras model on the same images.

    ``max_abs_diff`` is the measured error bound b. An image is a near-tie when the Keras top-1 margin (best minus
    second-best probability) is at most 2*b: there any difference within the bound may flip the top-1 (the model's
    indecision, not the conversion's). ``decisive_images`` counts the others; agreement and the accuracy change are
    judged there.
    """

    # A format whose outputs are not finite, or an engine that crashed, has an unbounded error: written as JSON's
    # Infinity (Python's json reads it back), not as null, which would make the manifest unreadable.
    model_config = ConfigDict(ser_json_inf_nan="constants")

    format: str
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float  # over every image, near-ties included (shown, not gated)
    accuracy: float | None
    keras_accuracy: float | None
    decisive_images: int | None = None
    decisive_agreement: float | None = None
    accuracy_change: float | None = None  # converted minus Keras, flips at near-ties not counted
    batch_consistency_max_diff: float  # batch of 1 vs batch of N, same images
    checker: str  # "onnx.checker ok", "n/a", or the checker's message
    gate: str  # the rule applied, in words
    passed: bool
    failures: list[str] = Field(default_factory=list)


class ValidationReport(BaseModel):
    source: str  # which split the images came from
    images: int
    batch_size: int
    passed: bool
    formats: list[FormatValidation]

    def table(self) -> str:
        """The report as a Markdown table (printed by the CLI and stored in the manifest)."""
        lines = [
            "| format | images | max abs diff | mean abs diff | top-1 agreement (decisive) | accuracy (keras) | "
            "batch 1 vs N | checker | gate | result |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for f in self.formats:
            accuracy = "-" if f.accuracy is None else f"{f.accuracy:.4f} ({f.keras_accuracy:.4f})"
            decisive = "" if f.decisive_agreement is None else (
                f" ({f.decisive_agreement:.2%} of {f.decisive_images})")
            lines.append(
                f"| {f.format} | {f.images} | {f.max_abs_diff:.2e} | {f.mean_abs_diff:.2e} | "
                f"{f.top1_agreement:.2%}{decisive} | {accuracy} | {f.batch_consistency_max_diff:.2e} | "
                f"{f.checker} | {f.gate} | {'pass' if f.passed else 'FAIL: ' + '; '.join(f.failures)} |"
            )
        return "\n".join(lines)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    created: datetime
    backbone: str
    family: str
    image_size: int
    class_names: list[str]
    preprocessing: dict[str, str]  # mode and a description of what the graph does to the pixels
    resize: ResizeRule | None = None  # schema 2; a schema-1 bundle described it only in words
    input: dict[str, Any]
    output: dict[str, Any]
    formats: dict[str, FormatEntry]
    training: dict[str, Any]  # the run's test/val metrics and where it came from
    validation: ValidationReport | None
    validation_overridden: bool = False  # --allow-mismatch published a bundle that failed a gate
    versions: dict[str, str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def sha256_path(path: Path) -> tuple[str, int, int]:
    """(sha256, total bytes, file count) of a file, or of a directory's files in sorted relative-path order."""
    path = Path(path)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest(), path.stat().st_size, 1
    if not path.is_dir():
        raise BundleError(f"{path} is missing")
    digest = hashlib.sha256()
    total = count = 0
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        file_digest, size, _ = sha256_path(item)
        digest.update(f"{item.relative_to(path).as_posix()}\0{file_digest}\n".encode())
        total += size
        count += 1
    return digest.hexdigest(), total, count


def read_manifest(bundle_dir: Path) -> Manifest:
    """Parse ``manifest.json``; a missing or malformed manifest is a :class:`BundleError`."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a transferkit bundle: {MANIFEST_NAME} is missing")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise BundleError(f"{path} is not a valid bundle manifest: {str(exc).splitlines()[0]}") from None
    schema = raw.get("schema_version") if isinstance(raw, dict) else None
    if isinstance(schema, int) and schema not in SUPPORTED_SCHEMAS:
        raise BundleError(f"{path}: manifest schema version {schema} was written by a newer transferkit; this one "
                          f"reads schema {', '.join(map(str, SUPPORTED_SCHEMAS))} (upgrade transferkit)")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = str(exc).splitlines()
        raise BundleError(f"{path} is not a valid bundle manifest: {' '.join(first[:3])}") from None


def verify_bundle(bundle_dir: Path, manifest: Manifest, formats: list[str] | None = None) -> None:
    """Check every listed format's sha256 and size against the manifest; raise :class:`BundleError` on mismatch."""
    bundle_dir = Path(bundle_dir)
    for name in formats or list(manifest.formats):
        entry = manifest.formats.get(name)
        if entry is None:
            raise BundleError(f"bundle {manifest.name} has no {name} format (it has {', '.join(manifest.formats)})")
        target = bundle_dir / entry.file
        if not target.exists():
            raise BundleError(f"bundle {manifest.name}: {entry.file} is missing")
        digest, size, _ = sha256_path(target)
        if digest != entry.sha256 or size != entry.bytes:
            raise BundleError(
                f"bundle {manifest.name}: {entry.file} does not match its manifest checksum (expected sha256 "
                f"{entry.sha256[:12]}… and {entry.bytes} bytes, found {digest[:12]}… and {size} bytes); "
                f"the file was modified or truncated, re-export the bundle"
            )
