"""The bundle contract: ``manifest.json``, written by export and read by the service, ``predict`` and benchmarks.

A bundle is a directory holding one model in several formats plus this manifest. Every format takes one named input
(float32 RGB pixels 0-255, shape [N, H, W, 3], dynamic N) and returns one named output (class probabilities [N, C]);
the backbone's preprocessing is inside the graph, so no reader needs to know the backbone. The manifest records each
file's sha256 so a loader can refuse a tampered or truncated model before using it.

Pydantic only: no TensorFlow, no onnxruntime (the service reads manifests without either).
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transferkit.core.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

Backend = Literal["savedmodel", "onnx", "onnx-fp16", "onnx-int8"]
BACKENDS: tuple[str, ...] = ("savedmodel", "onnx", "onnx-fp16", "onnx-int8")
FORMAT_FILES: dict[str, str] = {
    "savedmodel": "saved_model",
    "onnx": "model.onnx",
    "onnx-fp16": "model.fp16.onnx",
    "onnx-int8": "model.int8.onnx",
}
FORMAT_PRECISION: dict[str, str] = {"savedmodel": "fp32", "onnx": "fp32", "onnx-fp16": "fp16", "onnx-int8": "int8"}


class FormatEntry(BaseModel):
    """One exported file (or the SavedModel directory) and how to call it."""

    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: str  # of the file; for a directory, of its sorted (relative path, content hash) list
    bytes: int
    files: int = 1
    input_name: str
    output_name: str
    input_dtype: str = "float32"
    output_dtype: str = "float32"
    precision: Literal["fp32", "fp16", "int8"]
    opset: int | None = None


class FormatValidation(BaseModel):
    """How one format answered compared with the Keras model on the same images."""

    format: str
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    accuracy: float | None
    keras_accuracy: float | None
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
            "| format | images | max abs diff | mean abs diff | top-1 agreement | accuracy (keras) | batch 1 vs N | "
            "checker | gate | result |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for f in self.formats:
            accuracy = "-" if f.accuracy is None else f"{f.accuracy:.4f} ({f.keras_accuracy:.4f})"
            lines.append(
                f"| {f.format} | {f.images} | {f.max_abs_diff:.2e} | {f.mean_abs_diff:.2e} | "
                f"{f.top1_agreement:.2%} | {accuracy} | {f.batch_consistency_max_diff:.2e} | {f.checker} | "
                f"{f.gate} | {'pass' if f.passed else 'FAIL: ' + '; '.join(f.failures)} |"
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
        manifest = Manifest.model_validate_json(path.read_text())
    except (ValidationError, ValueError) as exc:
        first = str(exc).splitlines()
        raise BundleError(f"{path} is not a valid bundle manifest: {' '.join(first[:3])}") from None
    if manifest.schema_version != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema version {manifest.schema_version}, this transferkit reads {SCHEMA_VERSION}")
    return manifest


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
