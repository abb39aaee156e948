"""The resolved training configuration (written to the run as ``config.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass
class HeadConfig:
    """The classification head. ``pool``: GAP -> dropout -> [dense -> dropout] -> softmax.
    ``flatten``: 2x2 average pool -> flatten -> dense (128) -> dropout (0.4) -> softmax."""

    kind: Literal["pool", "flatten"] = "pool"
    dropout: float = 0.2
    hidden_units: int = 0
    hidden_dropout: float | None = None
    l2: float = 0.0


Strategy = Literal["feature-extraction", "fine-tune", "scratch"]
STRATEGIES: tuple[str, ...] = ("feature-extraction", "fine-tune", "scratch")
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "nadam", "rmsprop")
FLIPS: tuple[str, ...] = ("horizontal", "vertical", "horizontal_and_vertical", "none")


@dataclass
class AugmentConfig:
    """Random augmentation applied to the training split only (Keras preprocessing layers)."""

    enabled: bool = True
    flip: str = "horizontal"
    rotation: float = 0.1  # fraction of a full turn
    shift: float = 0.1  # fraction of width/height
    zoom: float = 0.1
    contrast: float = 0.1

    @property
    def active(self) -> bool:
        return self.enabled and (
            self.flip != "none" or any(v > 0 for v in (self.rotation, self.shift, self.zoom, self.contrast))
        )


@dataclass
class TrainConfig:
    data: str
    out: str
    backbone: str = "MobileNetV2"
    image_size: int | None = None  # None: the backbone's default
    weights: str = "imagenet"  # imagenet | none | weights file | previous run directory
    strategy: Strategy = "fine-tune"
    alpha: float | None = None
    epochs: int = 10
    fine_tune_epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_lr: float | None = None  # None: learning_rate / 10
    optimizer: str = "adam"
    momentum: float = 0.9
    unfreeze: str = "50"
    patience: int = 5
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42
    strict: bool = False
    cache_features: bool = False
    kfold: int = 0
    mixed_precision: bool = False
    force: bool = False

    @property
    def resolved_fine_tune_lr(self) -> float:
        return self.fine_tune_lr if self.fine_tune_lr is not None else self.learning_rate / 10

    @property
    def runs_phase2(self) -> bool:
        return self.strategy == "fine-tune" and self.fine_tune_epochs > 0

    def to_dict(self) -> dict:
        return asdict(self)
