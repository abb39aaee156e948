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
OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "sgd", "nadam", "rmsprop")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
CLASS_WEIGHTS: tuple[str, ...] = ("none", "balanced")
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
    # None: "scratch" for --weights none (a frozen random base extracts chance-level features), else "fine-tune"
    strategy: Strategy | None = None
    alpha: float | None = None
    epochs: int = 10
    fine_tune_epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_lr: float | None = None  # None: learning_rate / 10
    optimizer: str = "adamw"
    weight_decay: float = 1e-4  # decoupled (AdamW); ignored by the other optimizers
    momentum: float = 0.9
    schedule: str = "cosine"  # per phase: linear warm-up, then cosine decay to 0 over the phase's epoch budget
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_weight: str = "none"  # balanced: weight each class by n / (classes * count) in the loss
    # Epochs before early stopping may stop or pick a best epoch. None: 0 with a pretrained base; a third of the
    # budget from scratch, where BatchNormalization's moving statistics lag behind the weights in the first epochs.
    early_stopping_start: int | None = None
    unfreeze: str = "50"
    patience: int = 5
    # True: each phase ends with the weights of its lowest validation loss (Keras's restore_best_weights). False keeps
    # the last epoch's: for a validation set too small to pick an epoch by, with a schedule that decays to 0.
    restore_best: bool = True
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
    resume: bool = False

    def __post_init__(self) -> None:
        if self.strategy is None:
            self.strategy = "scratch" if self.weights == "none" else "fine-tune"
        if isinstance(self.head, dict):
            self.head = HeadConfig(**self.head)
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)

    @property
    def resolved_early_stopping_start(self) -> int:
        if self.early_stopping_start is not None:
            return self.early_stopping_start
        return max(2, self.epochs // 3) if self.strategy == "scratch" and self.epochs > 2 else 0

    @property
    def resolved_fine_tune_lr(self) -> float:
        return self.fine_tune_lr if self.fine_tune_lr is not None else self.learning_rate / 10

    @property
    def runs_phase2(self) -> bool:
        return self.strategy == "fine-tune" and self.fine_tune_epochs > 0

    def to_dict(self) -> dict:
        return asdict(self)
