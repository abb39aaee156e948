"""The training configuration: one pydantic model holding every setting's default, bounds, choices and description.

``transferkit train``'s options are generated from these fields (:mod:`transferkit.training.cli`); the run's
``config.json`` is :class:`~transferkit.training.rundir.RunConfig`, this model with what the run resolved added; the
fields marked ``resume_invariant`` are the settings ``--resume`` requires to be unchanged. Descriptions name the
command-line flags because they are the flags' help. Pydantic only: no TensorFlow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Field metadata: a resumed run must have the same value as the run it continues (the others, e.g. --patience,
# may change between the interrupted command and the resuming one).
RESUME_INVARIANT: dict[str, Any] = {"resume_invariant": True}
# Settings of one command, not of the run: a run trained again from its config.json does not inherit them.
PER_INVOCATION = ("force", "resume")

Strategy = Literal["feature-extraction", "fine-tune", "scratch"]
Optimizer = Literal["adamw", "adam", "sgd", "nadam", "rmsprop"]
Schedule = Literal["cosine", "constant"]
ClassWeight = Literal["none", "balanced"]
Flip = Literal["horizontal", "vertical", "horizontal_and_vertical", "none"]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key in a --config file is an error, not ignored


class HeadConfig(_Settings):
    """The classification head. ``pool``: GAP -> dropout -> [dense -> dropout] -> softmax.
    ``flatten``: 2x2 average pool -> flatten -> dense (128) -> dropout (0.4) -> softmax."""

    kind: Literal["pool", "flatten"] = Field(
        "pool", description="pool: GAP->dropout->softmax; flatten: avgpool 2x2->flatten->dense 128->dropout 0.4")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout after pooling (pool head)")
    hidden_units: int = Field(0, ge=0, description="add a hidden dense layer of this width (0: none)")
    hidden_dropout: float | None = Field(
        None, ge=0, lt=1, description="dropout after the hidden layer (default: 0.5; 0.4 for the flatten head)")
    l2: float = Field(0.0, ge=0, description="L2 weight decay on the head's dense layers")


class AugmentConfig(_Settings):
    """Random augmentation applied to the training split only (Keras preprocessing layers)."""

    enabled: bool = Field(True, description="random augmentation of the training images; --no-augment turns it off")
    flip: Flip = Field("horizontal", description="random flips (none for digits or text)")
    rotation: float = Field(0.1, ge=0, le=1, description="max rotation, fraction of a full turn")
    shift: float = Field(0.1, ge=0, le=1, description="max translation, fraction of the size")
    zoom: float = Field(0.1, ge=0, le=1, description="max zoom in or out, fraction of the size")
    contrast: float = Field(0.1, ge=0, le=1, description="max contrast change, fraction")

    @property
    def active(self) -> bool:
        return self.enabled and (
            self.flip != "none" or any(v > 0 for v in (self.rotation, self.shift, self.zoom, self.contrast))
        )


class TrainConfig(_Settings):
    """One training run's settings. ``strategy`` left out is resolved from ``weights``, and ``fine_tune_epochs`` is
    0 unless the strategy fine-tunes; the other unset values are resolved by the run (see the properties)."""

    data: str = Field(description="class-folder dataset, or a folder with train/ val/ test/ sub-folders",
                      json_schema_extra=RESUME_INVARIANT)
    out: str = Field(description="run directory to create")
    backbone: str = Field("MobileNetV2", description="a registry name (see --list-backbones)",
                          json_schema_extra=RESUME_INVARIANT)
    image_size: int | None = Field(None, ge=1, description="square input size in px (default: the backbone's)",
                                   json_schema_extra=RESUME_INVARIANT)
    # Not resume-invariant itself: the run records and compares what it resolves to (RunConfig.weights_resolved).
    weights: str = Field("imagenet", description="imagenet, none, a weights file, or a previous run directory "
                                                 "(same backbone)")
    strategy: Strategy | None = Field(
        None, description="feature-extraction: phase 1 only; fine-tune: both phases; scratch: random weights, "
                          "everything trainable (the baseline transfer is compared against). Default: scratch with "
                          "--weights none (a frozen random base extracts chance-level features), fine-tune otherwise",
        json_schema_extra=RESUME_INVARIANT)
    alpha: float | None = Field(None, gt=0, description="width multiplier (MobileNet families)",
                                json_schema_extra=RESUME_INVARIANT)
    epochs: int = Field(10, ge=1, description="phase-1 epochs (max; early stopping)",
                        json_schema_extra=RESUME_INVARIANT)
    fine_tune_epochs: int = Field(5, ge=0, description="phase-2 epochs (0 skips fine-tuning; only with the "
                                                       "fine-tune strategy)", json_schema_extra=RESUME_INVARIANT)
    batch_size: int = Field(32, ge=1, description="images per training step", json_schema_extra=RESUME_INVARIANT)
    learning_rate: float = Field(1e-3, gt=0, description="phase-1 (peak) learning rate",
                                 json_schema_extra=RESUME_INVARIANT)
    fine_tune_lr: float | None = Field(None, gt=0, description="phase-2 learning rate (default: phase-1 rate / 10)",
                                       json_schema_extra=RESUME_INVARIANT)
    optimizer: Optimizer = Field("adamw", description="optimizer of both phases",
                                 json_schema_extra=RESUME_INVARIANT)
    weight_decay: float = Field(1e-4, ge=0, description="decoupled weight decay (adamw; ignored by the others)",
                                json_schema_extra=RESUME_INVARIANT)
    momentum: float = Field(0.9, ge=0, le=1, description="momentum for sgd", json_schema_extra=RESUME_INVARIANT)
    schedule: Schedule = Field("cosine", description="cosine: linear warm-up, then cosine decay to 0 over each "
                                                     "phase's epochs; constant", json_schema_extra=RESUME_INVARIANT)
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up per phase (cosine schedule)",
                                 json_schema_extra=RESUME_INVARIANT)
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the loss",
                                   json_schema_extra=RESUME_INVARIANT)
    class_weight: ClassWeight = Field(
        "none", description="balanced: weight the loss by n / (classes x count), for imbalanced folders",
        json_schema_extra=RESUME_INVARIANT)
    early_stopping_start: int | None = Field(
        None, ge=0, description="epochs before early stopping may stop or pick a best epoch (default: 0; a third of "
                                "--epochs for scratch, whose BatchNormalization statistics lag at first)")
    unfreeze: str = Field("50", description="phase 2 unfreezes the top N backbone layers, from a named layer on, "
                                            "or 'all'", json_schema_extra=RESUME_INVARIANT)
    patience: int = Field(5, ge=0, description="early-stopping patience (epochs, on val loss)")
    restore_best: bool = Field(
        True, description="end each phase with the weights of its best epoch by validation loss; "
                          "--no-restore-best keeps the last epoch's, e.g. when a few dozen validation images are too "
                          "few to pick an epoch by and the cosine schedule ends at 0")
    head: HeadConfig = Field(default_factory=HeadConfig, json_schema_extra=RESUME_INVARIANT)
    augment: AugmentConfig = Field(default_factory=AugmentConfig, json_schema_extra=RESUME_INVARIANT)
    val_fraction: float = Field(0.15, ge=0, lt=1, description="validation share when not pre-split",
                                json_schema_extra=RESUME_INVARIANT)
    test_fraction: float = Field(0.15, ge=0, lt=1, description="test share when not pre-split",
                                 json_schema_extra=RESUME_INVARIANT)
    seed: int = Field(42, ge=0, description="seed for the split, initialisation and shuffling",
                      json_schema_extra=RESUME_INVARIANT)
    strict: bool = Field(False, description="fail on the first unreadable image instead of skipping it")
    cache_features: bool = Field(False, description="phase 1 on features computed once by the frozen base (needs "
                                                    "--no-augment)", json_schema_extra=RESUME_INVARIANT)
    calibrate: bool = Field(True, description="fit temperature scaling on the validation split and fold it into the "
                            "saved model, so every format outputs calibrated probabilities; --no-calibrate turns it "
                            "off", json_schema_extra=RESUME_INVARIANT)
    kfold: int = Field(0, ge=0, description="also run K-fold cross-validation and report mean ± std (0: off)")
    mixed_precision: bool = Field(False, description="float16 compute on GPU", json_schema_extra=RESUME_INVARIANT)
    force: bool = Field(False, description="replace --out (and any interrupted run of it)")
    resume: bool = Field(False, description="continue the interrupted run of --out (same settings) from its last "
                                            "finished epoch")

    @field_validator("data", "out", mode="before")
    @classmethod
    def _path_text(cls, value: Any) -> Any:
        """A path (str or os.PathLike) as the text ``Path`` gives it: "runs/x/" and Path("runs/x") record alike."""
        if isinstance(value, (str, os.PathLike)) and os.fspath(value):
            return str(Path(value))
        return value

    @field_validator("kfold")
    @classmethod
    def _kfold_has_two_folds(cls, value: int) -> int:
        if value == 1:
            raise ValueError("must be 0 (off) or at least 2")
        return value

    @model_validator(mode="after")
    def _resolve_and_check(self) -> TrainConfig:
        if self.strategy is None:
            self.strategy = "scratch" if self.weights == "none" else "fine-tune"
        if self.strategy != "fine-tune":
            self.fine_tune_epochs = 0  # only fine-tuning has a phase 2: the record says none ran
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"split fractions must leave a training set, got val={self.val_fraction}, "
                             f"test={self.test_fraction}")
        if self.strategy == "scratch" and self.weights not in ("imagenet", "none"):
            raise ValueError("--strategy scratch trains from random weights; drop --weights")
        if self.cache_features and self.augment.active:
            raise ValueError("--cache-features needs phase 1 without augmentation: add --no-augment")
        if self.cache_features and self.strategy == "scratch":
            raise ValueError("--cache-features needs a frozen base; it does not apply to --strategy scratch")
        return self

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

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def resume_invariant_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The names of ``model``'s fields marked :data:`RESUME_INVARIANT`."""
    return tuple(name for name, field in model.model_fields.items()
                 if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("resume_invariant"))


def changed_settings(kept: BaseModel, new: BaseModel) -> list[str]:
    """One ``"name: kept A, now B"`` per resume-invariant setting that differs (nested ones by their own name, e.g.
    ``head.dropout``)."""
    before, after = kept.model_dump(mode="json"), new.model_dump(mode="json")
    return [change for name in resume_invariant_fields(type(kept))
            for change in _differences(name, before.get(name), after.get(name))]


def _differences(name: str, before: Any, after: Any) -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        return [change for key in {**before, **after}
                for change in _differences(f"{name}.{key}", before.get(key), after.get(key))]
    return [] if before == after else [f"{name}: kept {before!r}, now {after!r}"]
