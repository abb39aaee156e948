"""The run directory as data: one typed reader and writer for what ``transferkit train`` writes.

``config.json``, ``metrics.json`` and ``split.json`` are pydantic models with a ``schema_version``; reading a run
written by another version fails with one line that says so, instead of a ``KeyError`` somewhere downstream. Every
consumer (export, demo, batch evaluation, tests) asks this module which files form a split instead of parsing
``split.json`` itself. Pydantic only: no TensorFlow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transferkit.core.atomic import write_file_durably
from transferkit.core.errors import RunDirectoryError
from transferkit.training.config import PER_INVOCATION, RESUME_INVARIANT, TrainConfig

# 1: runs before the schema existed (no schema_version key). 2: typed run directory, hash-based splits.
RUN_SCHEMA_VERSION = 2
CONFIG, METRICS, SPLIT, LABELS = "config.json", "metrics.json", "split.json", "labels.json"
SplitName = Literal["train", "val", "test"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: int = RUN_SCHEMA_VERSION


class InputSpec(BaseModel):
    name: str = "image"
    shape: list[int | None]
    dtype: str = "float32"
    range: str = "RGB 0-255"


class RunConfig(TrainConfig, _Record):
    """``config.json``: the training configuration with every default resolved, and the environment."""

    image_size: int = Field(ge=1, description="square input size in px", json_schema_extra=RESUME_INVARIANT)
    early_stopping_start: int = Field(ge=0, description="epochs before early stopping may stop or pick a best epoch")
    weights_resolved: str = Field(description="where the backbone weights came from: imagenet, none, a file or run",
                                  json_schema_extra=RESUME_INVARIANT)
    preprocessing: str
    family: str
    input: InputSpec
    num_classes: int
    gpus: int = 0
    versions: dict[str, str] = {}


class SplitMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accuracy: float
    loss: float
    samples: int
    ece: float | None = None  # expected calibration error, 15 bins of the top-1 confidence (runs before issue 28: none)
    nll: float | None = None  # mean -log p(true class)


class ClassMetrics(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class TestMetrics(SplitMetrics):
    per_class: dict[str, ClassMetrics]
    macro_f1: float
    top5_accuracy: float | None = None  # more than 5 classes only


class CalibrationScores(BaseModel):
    ece: float
    nll: float


class SplitCalibration(BaseModel):
    """One split's scores with the uncalibrated and the calibrated (saved) model."""

    before: CalibrationScores
    after: CalibrationScores
    samples: int


class Calibration(BaseModel):
    """Temperature scaling: ``temperature`` is folded into the saved model (``applied``), or ``reason`` says why
    not (then ``temperature`` is None and before equals after)."""

    method: str = "temperature scaling (NLL on the validation split)"
    applied: bool
    temperature: float | None = None
    reason: str | None = None
    bins: int = 15
    argmax_unchanged: bool | None = None  # checked on every split's images
    val: SplitCalibration | None = None
    test: SplitCalibration | None = None


class Failure(BaseModel):
    """An optional step that failed; the run is complete without its output."""

    step: str
    error: str


class RunMetrics(_Record):
    """``metrics.json``. ``test``/``val``/``train`` are absent only when evaluation itself failed (see
    ``failures``)."""

    test: TestMetrics | None = None
    val: SplitMetrics | None = None
    train: SplitMetrics | None = None
    epochs: dict[str, int]
    timings: dict[str, float]
    diagnosis: dict[str, Any] | None = None
    data: dict[str, Any]
    notes: list[str] = []
    kfold: dict[str, Any] | None = None
    calibration: Calibration | None = None  # runs before issue 28: none
    failures: list[Failure] = []


class SplitEntry(BaseModel):
    split: SplitName
    label: str


class SkippedFile(BaseModel):
    file: str
    reason: str


class SplitRecord(_Record):
    """``split.json``: every file's split and label, relative to ``root``."""

    root: str
    presplit: bool
    method: str
    seed: int
    fractions: dict[str, float]
    class_names: list[str]
    files: dict[str, SplitEntry]
    skipped: list[SkippedFile] = []


Model = TypeVar("Model", bound=_Record)


def _read_json(run_dir: Path, name: str) -> Any:
    path = Path(run_dir) / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirectoryError(f"{run_dir} is not a transferkit run directory: {name} is missing") from None
    except json.JSONDecodeError as exc:
        raise RunDirectoryError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _read(run_dir: Path, name: str, model: type[Model]) -> Model:
    data = _read_json(run_dir, name)
    path = Path(run_dir) / name
    version = data.get("schema_version", 1) if isinstance(data, dict) else None
    if version != RUN_SCHEMA_VERSION:
        age = "an older" if isinstance(version, int) and version < RUN_SCHEMA_VERSION else "another"
        raise RunDirectoryError(
            f"{path} was written by {age} transferkit version (run schema {version}, this version reads "
            f"{RUN_SCHEMA_VERSION}): train the run again with this version, or use the version that wrote it"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RunDirectoryError(f"{path}: {where}: {first['msg']}") from None


def read_config(run_dir: Path) -> RunConfig:
    return _read(run_dir, CONFIG, RunConfig)


def read_settings(path: Path) -> dict[str, Any]:
    """The training settings recorded in a ``config.json`` (``path`` may be its run directory), to train the run
    again: its :class:`TrainConfig` fields, without what the run resolved from its environment (library versions,
    GPUs, input spec) and without the per-invocation ``force`` and ``resume``. Validated by the caller, which may
    change some first."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG
    if not path.is_file():
        raise RunDirectoryError(f"{path} not found: expected a run's {CONFIG} or its run directory")
    data = _read_json(path.parent, path.name)
    if not isinstance(data, dict):
        raise RunDirectoryError(f"{path} must be a JSON object of training settings")
    recorded_by_the_run = set(RunConfig.model_fields) - set(TrainConfig.model_fields)
    return {key: value for key, value in data.items() if key not in recorded_by_the_run | set(PER_INVOCATION)}


def read_metrics(run_dir: Path) -> RunMetrics:
    return _read(run_dir, METRICS, RunMetrics)


def read_split(run_dir: Path) -> SplitRecord:
    return _read(run_dir, SPLIT, SplitRecord)


def read_labels(run_dir: Path) -> list[str]:
    labels = _read_json(run_dir, LABELS)
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise RunDirectoryError(f"{Path(run_dir) / LABELS} must be a JSON list of class names")
    return labels


def write_json(path: Path, content: BaseModel | list | dict, exclude_none: bool = False) -> None:
    """Write JSON atomically and durably (temporary file, fsync, rename, fsync of the directory): an interrupted
    write or a crash never leaves half a file, and a resumed run finds what was written before it."""
    if isinstance(content, BaseModel):
        content = content.model_dump(mode="json", exclude_none=exclude_none)
    write_file_durably(Path(path), json.dumps(content, indent=2) + "\n")


def write_config(run_dir: Path, config: RunConfig) -> None:
    write_json(Path(run_dir) / CONFIG, config)


def write_metrics(run_dir: Path, metrics: RunMetrics) -> None:
    write_json(Path(run_dir) / METRICS, metrics, exclude_none=True)


def write_split(run_dir: Path, record: SplitRecord) -> None:
    write_json(Path(run_dir) / SPLIT, record)


def split_files(run_dir: Path, split: str = "test", data_root: Path | None = None) -> list[tuple[Path, str]]:
    """``(absolute path, class name)`` of every file the run assigned to ``split`` ("train", "val" or "test"),
    in the order ``split.json`` lists them. ``data_root`` replaces the recorded dataset root (a moved dataset)."""
    record = read_split(run_dir)
    root = Path(data_root) if data_root else Path(record.root)
    return [(root / path, item.label) for path, item in record.files.items() if item.split == split]
