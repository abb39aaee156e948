"""The backbone registry: one row per keras.applications backbone, read by every stage.

Nobody else hard-codes an input size or a preprocessing mode: training builds the model from a row, export records
the row's preprocessing in the bundle manifest, and the benchmarks sweep the rows. The facts come from
``keras/src/applications/*.py`` (Keras 3.15) and are checked by ``tests/test_backbones.py``; the published numbers
(parameters, size, accuracy, timings) come from the keras.io table shipped beside this file.

This module must not import TensorFlow or Keras: the service reads the registry without them.
"""

from __future__ import annotations

import csv
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Literal

from transferkit.core.errors import UsageError

# caffe: RGB->BGR, subtract the ImageNet mean, no scaling. tf: x/127.5 - 1. torch: x/255, ImageNet mean/std.
# builtin: the model rescales internally and expects 0-255 floats (normalising again is the classic bug).
PreprocessingMode = Literal["caffe", "tf", "torch", "builtin"]
PREPROCESSING_MODES: tuple[str, ...] = ("caffe", "tf", "torch", "builtin")

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Published:
    """The keras.io table row for a backbone (include_top=True, 1000 ImageNet classes)."""

    size_mb: float | None
    top1: float | None
    top5: float | None
    parameters: int | None  # exact count where the table gives one, else None
    parameters_approx: float | None  # millions, as printed ("5.3M")
    depth: int | None
    cpu_ms_per_step: float | None  # batch of 32, 92-core EPYC
    gpu_ms_per_step: float | None  # batch of 32, A100


@dataclass(frozen=True)
class Backbone:
    """Everything a stage needs to know about one keras.applications backbone."""

    name: str  # the keras.applications constructor, e.g. "MobileNetV2"
    family: str  # e.g. "mobilenet_v2"; also the keras.applications submodule holding preprocess_input
    default_size: int
    min_size: int
    preprocessing: PreprocessingMode
    # ImageNet weights exist only for these square sizes (None: any size >= min_size).
    imagenet_sizes: tuple[int, ...] | None = None
    # True: Keras refuses other sizes with imagenet weights; False: it warns and loads the default-size weights,
    # which is fine for include_top=False because convolution weights do not depend on the input size.
    imagenet_sizes_strict: bool = False
    # Width multipliers with published ImageNet weights (MobileNet families only).
    alphas: tuple[float, ...] | None = None
    published: Published | None = field(default=None, compare=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.default_size, self.default_size, 3)

    def constructor(self) -> Callable[..., Any]:
        """The keras.applications constructor (imports Keras)."""
        applications = importlib.import_module("keras.applications")
        return getattr(applications, self.name)

    def check_input_size(self, size: int, weights: str | None = "imagenet") -> list[str]:
        """Raise UsageError if ``size`` cannot work; return warnings for sizes that work with caveats."""
        if size < self.min_size:
            raise UsageError(
                f"{self.name} needs an input size of at least {self.min_size} px, got {size}"
            )
        warnings: list[str] = []
        if weights == "imagenet" and self.imagenet_sizes and size not in self.imagenet_sizes:
            allowed = ", ".join(str(s) for s in self.imagenet_sizes)
            if self.imagenet_sizes_strict:
                raise UsageError(
                    f"{self.name} ImageNet weights exist only for input size {allowed}, got {size}; "
                    f"use --image-size {self.imagenet_sizes[-1]} or --weights none"
                )
            warnings.append(
                f"{self.name} ImageNet weights were trained at {allowed} px; Keras loads the "
                f"{self.imagenet_sizes[-1]} px weights for {size} px inputs"
            )
        return warnings

    def check_alpha(self, alpha: float | None, weights: str | None = "imagenet") -> None:
        """Raise UsageError for a width multiplier this backbone does not take (or has no weights for)."""
        if alpha is None:
            return
        if self.alphas is None:
            raise UsageError(f"--alpha applies to MobileNet backbones only, not {self.name}")
        if weights == "imagenet" and alpha not in self.alphas:
            allowed = ", ".join(str(a) for a in self.alphas)
            raise UsageError(
                f"{self.name} ImageNet weights exist only for alpha {allowed}, got {alpha}"
            )


def _row(name: str, family: str, size: int, min_size: int, mode: PreprocessingMode, **kw: Any) -> Backbone:
    return Backbone(name, family, size, min_size, mode, **kw)


_MOBILENET_V2_SIZES = (96, 128, 160, 192, 224)
_EFFICIENTNET_SIZES = {"B0": 224, "B1": 240, "B2": 260, "B3": 300, "B4": 380, "B5": 456, "B6": 528, "B7": 600}
_EFFICIENTNET_V2_SIZES = {"B0": 224, "B1": 240, "B2": 260, "B3": 300, "S": 384, "M": 480, "L": 480}

_ROWS: tuple[Backbone, ...] = (
    _row("Xception", "xception", 299, 71, "tf"),
    _row("VGG16", "vgg16", 224, 32, "caffe"),
    _row("VGG19", "vgg19", 224, 32, "caffe"),
    _row("ResNet50", "resnet", 224, 32, "caffe"),
    _row("ResNet101", "resnet", 224, 32, "caffe"),
    _row("ResNet152", "resnet", 224, 32, "caffe"),
    _row("ResNet50V2", "resnet_v2", 224, 32, "tf"),
    _row("ResNet101V2", "resnet_v2", 224, 32, "tf"),
    _row("ResNet152V2", "resnet_v2", 224, 32, "tf"),
    _row("InceptionV3", "inception_v3", 299, 75, "tf"),
    _row("InceptionResNetV2", "inception_resnet_v2", 299, 75, "tf"),
    _row("MobileNet", "mobilenet", 224, 32, "tf", imagenet_sizes=(128, 160, 192, 224),
         alphas=(0.25, 0.5, 0.75, 1.0)),
    _row("MobileNetV2", "mobilenet_v2", 224, 32, "tf", imagenet_sizes=_MOBILENET_V2_SIZES,
         alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4)),
    _row("MobileNetV3Small", "mobilenet_v3", 224, 32, "builtin", imagenet_sizes=(224,), alphas=(0.75, 1.0)),
    _row("MobileNetV3Large", "mobilenet_v3", 224, 32, "builtin", imagenet_sizes=(224,), alphas=(0.75, 1.0)),
    _row("DenseNet121", "densenet", 224, 32, "torch"),
    _row("DenseNet169", "densenet", 224, 32, "torch"),
    _row("DenseNet201", "densenet", 224, 32, "torch"),
    _row("NASNetMobile", "nasnet", 224, 32, "tf", imagenet_sizes=(224,), imagenet_sizes_strict=True),
    _row("NASNetLarge", "nasnet", 331, 32, "tf", imagenet_sizes=(331,), imagenet_sizes_strict=True),
    *(_row(f"EfficientNet{v}", "efficientnet", s, 32, "builtin") for v, s in _EFFICIENTNET_SIZES.items()),
    *(_row(f"EfficientNetV2{v}", "efficientnet_v2", s, 32, "builtin") for v, s in _EFFICIENTNET_V2_SIZES.items()),
    *(_row(f"ConvNeXt{v}", "convnext", 224, 32, "builtin") for v in ("Tiny", "Small", "Base", "Large", "XLarge")),
)


def _number(text: str) -> float | None:
    text = text.strip()
    return None if text in ("", "-") else float(text)


@cache
def published_table() -> dict[str, Published]:
    """The keras.io applications table, keyed by model name."""
    text = resources.files("transferkit.core").joinpath("keras_applications_table.tsv").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    table: dict[str, Published] = {}
    for rec in csv.DictReader(lines, delimiter="\t"):
        params = rec["parameters"].strip()
        exact = int(params) if params.isdigit() else None
        approx = float(params.rstrip("M")) if params.endswith("M") else (exact / 1e6 if exact else None)
        depth = _number(rec["depth"])
        table[rec["model"]] = Published(
            size_mb=_number(rec["size_mb"]),
            top1=_number(rec["top1"]),
            top5=_number(rec["top5"]),
            parameters=exact,
            parameters_approx=approx,
            depth=int(depth) if depth is not None else None,
            cpu_ms_per_step=_number(rec["cpu_ms_per_step"]),
            gpu_ms_per_step=_number(rec["gpu_ms_per_step"]),
        )
    return table


@cache
def registry() -> dict[str, Backbone]:
    """All backbones by name, in the order of the keras.io table (MobileNetV3 beside its family)."""
    table = published_table()
    return {
        row.name: Backbone(**{**row.__dict__, "published": table.get(row.name)})
        for row in _ROWS
    }


def get_backbone(name: str) -> Backbone:
    """Look a backbone up by name, case-insensitively; raise UsageError listing the choices otherwise."""
    rows = registry()
    if name in rows:
        return rows[name]
    by_lower = {key.lower(): row for key, row in rows.items()}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    raise UsageError(f"unknown backbone {name!r}; choose one of: {', '.join(rows)}")


def parse_backbones(spec: str) -> list[Backbone]:
    """``"all"`` or a comma-separated list of names -> registry rows."""
    if spec.strip().lower() == "all":
        return list(registry().values())
    return [get_backbone(name.strip()) for name in spec.split(",") if name.strip()]
