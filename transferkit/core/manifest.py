"""The bundle contract: ``manifest.json``, written by export and read by the service, ``predict`` and benchmarks.

A bundle is a directory holding one model in several formats plus this manifest. Every format takes one named input
(RGB pixels 0-255, shape [N, H, W, 3], dynamic N, of the format's ``input_dtype``) and returns one named output (class
probabilities [N, C]); the cast to float32 and the backbone's preprocessing are inside the graph, so no reader needs
to know the backbone. The manifest records each file's sha256 so a loader can refuse a tampered or truncated model
before using it, and the resize rule as data so a consumer outside transferkit can reproduce the pixels.

What a loader trusts is what the manifest covers, and nothing else (issue #25): every file entry stays inside the
bundle (relative, no ``..``, checked when the manifest is read); no symbolic link and no file the manifest does not
list may be in the bundle (an ONNX file's external data would be such a file, and an ONNX file that declares some is
refused too); and a file is read once, hashed, and handed to the engine as those same bytes (:func:`verify_entry`).

Schema history: 1 - float32 input for every format, no resize rule; 2 - uint8 input (``FormatEntry.input_dtype``),
``resize``; 3 - ``documents`` (the model card, ``MODEL_CARD.md``, with its checksum) and ``calibration`` (the
temperature folded into every format, ECE/NLL before and after). All are read; ``FormatEntry.input_dtype`` defaults
to float32, which is what a schema-1 file means, and the schema-3 fields default to none.

Pydantic and the standard library only: no TensorFlow, no onnxruntime, no onnx (the service reads manifests
without them).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transferkit.core.atomic import MARKER
from transferkit.core.errors import BundleError

SCHEMA_VERSION = 4
SUPPORTED_SCHEMAS: tuple[int, ...] = (1, 2, 3, 4)
MODEL_CARD_NAME = "MODEL_CARD.md"
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
    quantization: dict[str, Any] | None = None  # int8: method, signedness, excluded nodes (export/quantize.py)
    cam_output: str | None = None  # schema 4: the output holding the top class's activation map [N, h, w]


class DocumentEntry(BaseModel):
    """A file of the bundle that no engine reads (the model card), covered by a checksum like the formats."""

    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: str
    bytes: int
    media_type: str = "text/markdown"


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
    # schema 4: the class activation map against Keras', max |Δ| over the decisive images whose top-1 agrees,
    # relative to the largest |value| of the Keras maps (export/validate.py); None where the format has no map.
    # A map beyond its bound is refused (that backend answers no /explain); the format's answers are not.
    cam_max_rel_diff: float | None = None
    cam_images: int | None = None
    cam_passed: bool | None = None


class ExplainInfo(BaseModel):
    """Whether the bundle's graphs compute class activation maps (training/cam.py), and where."""

    model_config = ConfigDict(extra="forbid")

    available: bool
    output: str | None = None  # the graphs' output name
    resolution: list[int] | None = None  # [h, w] of the feature map
    method: str = ("CAM: the last feature maps weighted by the class layer's weights for the top class "
                   "(exact for a global-average-pooling head)")
    reason: str = ""  # why not, when not available


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
            "batch 1 vs N | map Δ (relative) | checker | gate | result |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for f in self.formats:
            accuracy = "-" if f.accuracy is None else f"{f.accuracy:.4f} ({f.keras_accuracy:.4f})"
            decisive = "" if f.decisive_agreement is None else (
                f" ({f.decisive_agreement:.2%} of {f.decisive_images})")
            cam = "-" if f.cam_max_rel_diff is None else f"{f.cam_max_rel_diff:.1e}" + (
                "" if f.cam_passed else " (map refused)")
            lines.append(
                f"| {f.format} | {f.images} | {f.max_abs_diff:.2e} | {f.mean_abs_diff:.2e} | "
                f"{f.top1_agreement:.2%}{decisive} | {accuracy} | {f.batch_consistency_max_diff:.2e} | {cam} | "
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
    # schema 3: the model card and other documents, by name; the calibration folded into every format (temperature,
    # ECE/NLL before and after on the run's validation and test splits), None for an uncalibrated or older bundle
    documents: dict[str, DocumentEntry] = Field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    explain: ExplainInfo | None = None  # schema 4; None: exported before class activation maps

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# Files a bundle may hold beside its formats: this manifest, the marker that lets --force replace the directory
# (core/atomic.py) and BentoML's record of a model-store entry (``bentoml.models.create`` writes it). No engine reads
# them; any other file is refused (see check_bundle_files).
BUNDLE_EXTRAS = frozenset({MANIFEST_NAME, MARKER, "model.yaml"})
CHUNK = 1 << 20


def entry_path(bundle_dir: Path, format_name: str, file: str) -> Path:
    """``bundle_dir / file`` for the manifest entry ``formats[format_name].file``, or a :class:`BundleError` naming
    the entry when it could lead outside the bundle: an absolute path, a ``..`` step, or a symbolic link on the way
    that resolves elsewhere. Checked when the manifest is read, before any model file is opened."""
    where = f"{Path(bundle_dir) / MANIFEST_NAME}: entry formats[{format_name!r}].file = {file!r}"
    posix, windows = PurePosixPath(file), PureWindowsPath(file)
    if not file.strip() or "\0" in file or posix == PurePosixPath("."):
        raise BundleError(f"{where} names no file of the bundle")
    if posix.is_absolute() or windows.drive or windows.root:  # "C:\x" and "\\host\share" too, on any system
        raise BundleError(f"{where} is an absolute path; a bundle names its files relative to its directory")
    if ".." in posix.parts or ".." in windows.parts:
        raise BundleError(f"{where} steps out of the bundle directory ('..'); a bundle names only its own files")
    root = Path(bundle_dir)
    try:
        inside = (root / posix).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
        inside = False
    if not inside:
        raise BundleError(f"{where} resolves outside the bundle directory (through a symbolic link)")
    return root / posix


def regular_files(root: Path, where: str) -> list[PurePosixPath]:
    """Every regular file under ``root``, relative to it; a symbolic link (to a file or a directory) or a special
    file anywhere below is a :class:`BundleError`. Not os.walk or Path.rglob: they skip a linked directory silently,
    while TensorFlow follows it, so a checksum walk would miss what the engine reads."""
    found: list[PurePosixPath] = []
    pending = [PurePosixPath()]
    while pending:
        relative = pending.pop()
        try:
            with os.scandir(Path(root) / relative) as scan:
                items = list(scan)
        except OSError as exc:
            raise BundleError(f"{where}: cannot list {relative.as_posix()!r} ({exc.strerror})") from None
        for item in items:
            child = relative / item.name
            if item.is_symlink():
                raise BundleError(f"{where}: {child.as_posix()!r} is a symbolic link; a bundle holds regular files "
                                  "only (a link would let an engine read what no checksum covers)")
            if item.is_dir(follow_symlinks=False):
                pending.append(child)
            elif item.is_file(follow_symlinks=False):
                found.append(child)
            else:
                raise BundleError(f"{where}: {child.as_posix()!r} is not a regular file or directory")
    return found


def _open_inside(root: Path, relative: PurePosixPath, where: str) -> int:
    """A read-only descriptor of ``root / relative`` opened one component at a time without following a symbolic
    link (O_NOFOLLOW), so what is read is the file inside the bundle even if a link appeared after the walk. Where
    the system lacks O_NOFOLLOW or dir_fd (Windows), a plain open: the walk's refusal of links is the check there."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    # O_NONBLOCK: opening a FIFO planted in a bundle must not hang (it is refused as not a regular file below).
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        if not nofollow or os.open not in os.supports_dir_fd:
            return os.open(Path(root) / relative, flags)
        directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in relative.parts[:-1]:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=directory)
                os.close(directory)
                directory = inner
            return os.open(relative.parts[-1], flags | nofollow, dir_fd=directory)
        finally:
            os.close(directory)
    except FileNotFoundError:
        raise BundleError(f"{where}: {relative.as_posix()} is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleError(f"{where}: {relative.as_posix()!r} is or passes through a symbolic link; a bundle "
                              "holds regular files only") from None
        if exc.errno == errno.ENOTDIR:  # a component is a file, or (on some systems) a link to a directory
            raise BundleError(f"{where}: {relative.as_posix()!r} passes through a symbolic link or a file where a "
                              "directory is expected") from None
        raise BundleError(f"{where}: cannot read {relative.as_posix()!r} ({exc.strerror})") from None


def _checked_regular(handle: BinaryIO, relative: PurePosixPath, where: str) -> int:
    """The size of the open file, refusing anything that is not a regular file (a FIFO, a device)."""
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(f"{where}: {relative.as_posix()!r} is not a regular file")
    return info.st_size


def read_inside(root: Path, relative: PurePosixPath, where: str, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``root / relative`` (see :func:`_open_inside`). With ``max_bytes``, a longer
    file is read only to ``max_bytes + 1``: enough for a size check to fail, without holding a huge file in memory."""
    with os.fdopen(_open_inside(root, relative, where), "rb") as handle:
        size = _checked_regular(handle, relative, where)
        if max_bytes is not None and size > max_bytes:
            return handle.read(max(max_bytes, 0) + 1)
        return handle.read()


def _hash_inside(root: Path, relative: PurePosixPath, where: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with os.fdopen(_open_inside(root, relative, where), "rb") as handle:
        _checked_regular(handle, relative, where)
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sha256_path(path: Path) -> tuple[str, int, int]:
    """(sha256, total bytes, file count) of a file, or of a directory's files in sorted relative-path order (the
    digest of "path\\0file-sha256\\n" lines). A symbolic link, to or anywhere below ``path``, is a BundleError."""
    path = Path(path)
    if path.is_symlink():
        raise BundleError(f"{path} is a symbolic link; a bundle holds regular files only")
    if path.is_dir():
        digest = hashlib.sha256()
        total = count = 0
        for relative in sorted(regular_files(path, str(path)), key=lambda p: p.parts):
            file_digest, size = _hash_inside(path, relative, str(path))
            digest.update(f"{relative.as_posix()}\0{file_digest}\n".encode())
            total += size
            count += 1
        return digest.hexdigest(), total, count
    if not path.exists():
        raise BundleError(f"{path} is missing")
    file_digest, size = _hash_inside(path.parent, PurePosixPath(path.name), str(path.parent))
    return file_digest, size, 1


def read_manifest(bundle_dir: Path) -> Manifest:
    """Parse ``manifest.json`` and check that every file entry stays inside the bundle (:func:`entry_path`); a
    missing, linked or malformed manifest, or an entry pointing elsewhere, is a :class:`BundleError`."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not os.path.lexists(path):
        raise BundleError(f"{bundle_dir} is not a transferkit bundle: {MANIFEST_NAME} is missing")
    text = read_inside(bundle_dir, PurePosixPath(MANIFEST_NAME), f"bundle {bundle_dir}")
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise BundleError(f"{path} is not a valid bundle manifest: {str(exc).splitlines()[0]}") from None
    schema = raw.get("schema_version") if isinstance(raw, dict) else None
    if isinstance(schema, int) and schema not in SUPPORTED_SCHEMAS:
        raise BundleError(f"{path}: manifest schema version {schema} was written by a newer transferkit; this one "
                          f"reads schema {', '.join(map(str, SUPPORTED_SCHEMAS))} (upgrade transferkit)")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = str(exc).splitlines()
        raise BundleError(f"{path} is not a valid bundle manifest: {' '.join(first[:3])}") from None
    for name, entry in manifest.formats.items():
        entry_path(bundle_dir, name, entry.file)
    for name, document in manifest.documents.items():
        entry_path(bundle_dir, f"documents:{name}", document.file)
    return manifest


def check_bundle_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Every file in the bundle is a regular file that the manifest covers with a checksum (a format's file, or a
    file under a format's directory), or one of :data:`BUNDLE_EXTRAS`. This is also the rule for ONNX external
    data: a side file is an unlisted file (the manifest has no place for one), so such a bundle is refused."""
    listed = {PurePosixPath(entry.file) for entry in [*manifest.formats.values(), *manifest.documents.values()]}
    for relative in regular_files(bundle_dir, f"bundle {manifest.name}"):
        extra = len(relative.parts) == 1 and relative.name in BUNDLE_EXTRAS
        if not extra and not any(p in listed for p in (relative, *relative.parents)):
            raise BundleError(f"bundle {manifest.name}: {relative.as_posix()!r} is not listed in {MANIFEST_NAME}; "
                              "every file of a bundle must carry a checksum there: remove it or re-export the bundle")


def _refuse_external_data(manifest: Manifest, file: str, data: bytes) -> None:
    from transferkit.core.onnx_scan import external_tensors

    try:
        external = external_tensors(data)
    except ValueError as exc:
        raise BundleError(f"bundle {manifest.name}: {file} is not a valid ONNX file ({exc})") from None
    if external:
        tensor, location = external[0]
        raise BundleError(f"bundle {manifest.name}: {file} keeps {len(external)} tensor(s) in side files (tensor "
                          f"{tensor!r} in {location!r}); a bundle's ONNX files must be self-contained, since no "
                          "checksum covers external data: re-export the bundle")


def verify_entry(bundle_dir: Path, manifest: Manifest, name: str) -> bytes | None:
    """Check format ``name`` against its manifest entry. For a file, return the very bytes that were hashed: the
    caller loads those, never the path again, so the file cannot change between the check and the use. A directory
    (the SavedModel) is hashed file by file and None is returned."""
    entry = manifest.formats[name]
    target = entry_path(bundle_dir, name, entry.file)
    if not os.path.lexists(target):
        raise BundleError(f"bundle {manifest.name}: {entry.file} is missing")
    data = None
    if target.is_dir() and not target.is_symlink():
        digest, size, _ = sha256_path(target)
    else:
        data = read_inside(Path(bundle_dir), PurePosixPath(entry.file), f"bundle {manifest.name}", entry.bytes)
        digest, size = hashlib.sha256(data).hexdigest(), len(data)
    if digest != entry.sha256 or size != entry.bytes:
        raise BundleError(
            f"bundle {manifest.name}: {entry.file} does not match its manifest checksum (expected sha256 "
            f"{entry.sha256[:12]}… and {entry.bytes} bytes, found {digest[:12]}… and {size} bytes); "
            f"the file was modified or truncated, re-export the bundle"
        )
    if data is not None and name.startswith("onnx"):
        _refuse_external_data(manifest, entry.file, data)
    return data


def verify_document(bundle_dir: Path, manifest: Manifest, name: str) -> bytes:
    """The bytes of document ``name`` (e.g. the model card), checked against its manifest checksum."""
    document = manifest.documents[name]
    entry_path(bundle_dir, f"documents:{name}", document.file)
    data = read_inside(Path(bundle_dir), PurePosixPath(document.file), f"bundle {manifest.name}", document.bytes)
    digest = hashlib.sha256(data).hexdigest()
    if digest != document.sha256 or len(data) != document.bytes:
        raise BundleError(f"bundle {manifest.name}: {document.file} does not match its manifest checksum (expected "
                          f"sha256 {document.sha256[:12]}… and {document.bytes} bytes, found {digest[:12]}… and "
                          f"{len(data)} bytes); the file was modified or truncated, re-export the bundle")
    return data


def verify_bundle(bundle_dir: Path, manifest: Manifest, formats: list[str] | None = None) -> None:
    """Refuse links, special and unlisted files anywhere in the bundle, then check every listed format's and
    document's sha256 and size against the manifest (and ONNX files for external data); raise :class:`BundleError`
    on any mismatch."""
    bundle_dir = Path(bundle_dir)
    for name, entry in manifest.formats.items():
        entry_path(bundle_dir, name, entry.file)  # a Manifest built in memory was not checked by read_manifest
    check_bundle_files(bundle_dir, manifest)
    for name in manifest.documents:
        verify_document(bundle_dir, manifest, name)
    for name in formats or list(manifest.formats):
        if name not in manifest.formats:
            raise BundleError(f"bundle {manifest.name} has no {name} format (it has {', '.join(manifest.formats)})")
        verify_entry(bundle_dir, manifest, name)
