"""Build the transfer-learning classifier from a registry row, and unfreeze it for fine-tuning.

Model = input "image" (RGB 0-255, float32) -> "preprocessing" (standard Keras layers) -> backbone (include_top=False,
called with ``training=False`` so BatchNormalization stays in inference mode, also while fine-tuning) -> head (a nested
model named "head", so its weights can be trained alone on cached features).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from transferkit.core.backbones import Backbone
from transferkit.core.errors import RunDirectoryError, UsageError, WeightsUnavailableError
from transferkit.training.config import HeadConfig
from transferkit.training.layers import preprocessing_block
from transferkit.training.rundir import read_config

SCRATCH_BN_MOMENTUM = 0.9


def build_head(feature_shape: tuple[int, ...], num_classes: int, config: HeadConfig) -> keras.Model:
    """The head as a nested model taking the backbone's feature map."""
    regularizer = keras.regularizers.L2(config.l2) if config.l2 > 0 else None
    features = keras.Input(feature_shape, name="features")
    if config.kind == "flatten":
        x = keras.layers.AveragePooling2D(2, padding="same", name="head_avg_pool")(features)
        x = keras.layers.Flatten(name="head_flatten")(x)
        units = config.hidden_units or 128
        dropout = 0.4 if config.hidden_dropout is None else config.hidden_dropout
        x = keras.layers.Dense(units, activation="relu", kernel_regularizer=regularizer, name="head_hidden")(x)
        x = keras.layers.Dropout(dropout, name="head_hidden_dropout")(x)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(features)
        if config.dropout > 0:
            x = keras.layers.Dropout(config.dropout, name="head_dropout")(x)
        if config.hidden_units > 0:
            x = keras.layers.Dense(
                config.hidden_units, activation="relu", kernel_regularizer=regularizer, name="head_hidden"
            )(x)
            dropout = 0.5 if config.hidden_dropout is None else config.hidden_dropout
            x = keras.layers.Dropout(dropout, name="head_hidden_dropout")(x)
    # float32 softmax: stable under a mixed-precision policy.
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=regularizer, dtype="float32", name="probabilities"
    )(x)
    return keras.Model(features, outputs, name="head")


def _offline_message(backbone: Backbone, exc: Exception) -> str:
    text = str(exc)
    url = next((word for word in text.split() if word.startswith("http")), "").rstrip(":")
    file_hint = f" ({url.rsplit('/', 1)[-1]})" if url else ""
    return (
        f"ImageNet weights for {backbone.name} are not in the Keras cache (~/.keras/models) and could not be "
        f"downloaded{file_hint}: {text.split(': ')[-1]}. Copy the file into ~/.keras/models on this machine, "
        f"pass --weights PATH to a weights file, or use --weights none"
    )


def build_backbone(
    backbone: Backbone, image_size: int, weights: str, alpha: float | None = None
) -> keras.Model:
    """The backbone with ``include_top=False``. ``weights``: "imagenet", "none", or a weights file path."""
    kwargs: dict = {"include_top": False, "input_shape": (image_size, image_size, 3)}
    if alpha is not None:
        kwargs["alpha"] = alpha
    constructor = backbone.constructor()
    if weights == "none":
        return constructor(weights=None, **kwargs)
    if weights == "imagenet":
        try:
            return constructor(weights="imagenet", **kwargs)
        except Exception as exc:  # keras' get_file raises a bare Exception("URL fetch failure ...")
            if "URL fetch failure" in str(exc) or isinstance(exc, OSError):
                raise WeightsUnavailableError(_offline_message(backbone, exc)) from None
            raise
    path = Path(weights)
    if not path.is_file():
        raise UsageError(f"--weights must be imagenet, none, a weights file or a run directory; {weights} not found")
    base = constructor(weights=None, **kwargs)
    try:
        base.load_weights(path)
    except Exception as exc:
        raise WeightsUnavailableError(
            f"weights file {path} does not fit {backbone.name} at {image_size} px: {str(exc).splitlines()[0]}"
        ) from None
    return base


def find_backbone_layer(model: keras.Model) -> keras.Model:
    """The nested backbone model inside a transferkit classifier (not the head, not the preprocessing block)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model) and layer.name not in ("head", "preprocessing"):
            return layer
    raise RunDirectoryError(f"model {model.name} has no nested backbone model")


def find_head_layer(model: keras.Model) -> keras.Model:
    return model.get_layer("head")


def load_run_model(run_dir: Path) -> keras.Model:
    """Load ``model.keras`` from a run directory (plain ``keras.models.load_model`` works too)."""
    path = Path(run_dir) / "model.keras"
    if not path.is_file():
        raise RunDirectoryError(f"{run_dir} is not a transferkit run: {path.name} is missing")
    # safe_mode=True (Keras's default, stated so it is never dropped): a model.keras holding a Python lambda is
    # refused instead of running its code.
    return keras.models.load_model(path, compile=False, safe_mode=True)


def transfer_from_run(base: keras.Model, backbone: Backbone, run_dir: Path) -> None:
    """Copy the backbone weights of a previous run (model A) into ``base`` (model B)."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise RunDirectoryError(f"--weights {run_dir}: not a transferkit run (config.json missing)")
    # read_config refuses a run of another schema version: its model.keras may hold layers this version lacks.
    source_backbone = read_config(run_dir).backbone
    if source_backbone != backbone.name:
        raise UsageError(
            f"--weights {run_dir}: that run used backbone {source_backbone}, this one {backbone.name}"
        )
    source = find_backbone_layer(load_run_model(run_dir))
    try:
        base.set_weights(source.get_weights())
    except ValueError as exc:
        raise WeightsUnavailableError(f"--weights {run_dir}: backbone weights do not fit ({exc})") from None


def build_classifier(
    backbone: Backbone,
    num_classes: int,
    image_size: int,
    weights: str,
    head: HeadConfig,
    alpha: float | None = None,
    trainable_base: bool = False,
) -> keras.Model:
    """The full classifier. ``trainable_base=True`` (training from scratch) lets BatchNormalization learn."""
    run_dir = Path(weights) if weights not in ("imagenet", "none") and Path(weights).is_dir() else None
    base = build_backbone(backbone, image_size, "none" if run_dir else weights, alpha)
    if run_dir is not None:
        transfer_from_run(base, backbone, run_dir)
    base.trainable = trainable_base
    if trainable_base:
        # ImageNet recipes use BatchNormalization momentum 0.99-0.999, tuned for hundreds of thousands of steps; a
        # small dataset trained from scratch sees a few hundred, and the moving statistics that inference uses
        # would still be near their initial values (validation at chance while training accuracy climbs).
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = SCRATCH_BN_MOMENTUM
    inputs = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
    x = preprocessing_block(backbone.preprocessing, name="preprocessing")(inputs)
    # training=False keeps BatchNormalization in inference mode when the base is later unfrozen (keras.io guide);
    # None (the Keras default) for training from scratch, where the statistics must be learned.
    features = base(x, training=None if trainable_base else False)
    outputs = build_head(tuple(base.output.shape[1:]), num_classes, head)(features)
    return keras.Model(inputs, outputs, name=f"{backbone.name}_classifier")


def resolve_unfreeze(base: keras.Model, spec: str) -> int:
    """Index of the first base layer to unfreeze for ``--unfreeze`` (a count, a layer name, or "all")."""
    layers = base.layers
    if spec == "all":
        return 0
    if spec.isdigit():
        return max(0, len(layers) - int(spec))
    names = [layer.name for layer in layers]
    if spec not in names:
        raise UsageError(
            f"--unfreeze {spec!r}: not a count, 'all', or a layer of {base.name} "
            f"(it has {len(names)} layers, e.g. {', '.join(names[-3:])})"
        )
    return names.index(spec)


def unfreeze_top(base: keras.Model, spec: str) -> int:
    """Make the top layers of ``base`` trainable, BatchNormalization excepted; return the trainable layer count."""
    start = resolve_unfreeze(base, spec)
    base.trainable = True
    trainable = 0
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
        trainable += int(layer.trainable and bool(layer.weights))
    return trainable


_MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")


def _float32_dtypes(config):
    """A serialized model config with every layer's dtype policy replaced by float32."""
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "dtype" and isinstance(value, str) and value in _MIXED_POLICIES:
                out[key] = "float32"
            elif key == "dtype" and isinstance(value, dict) and value.get("class_name") == "DTypePolicy":
                out[key] = {**value, "config": {**value.get("config", {}), "name": "float32"}}
            else:
                out[key] = _float32_dtypes(value)
        return out
    if isinstance(config, list):
        return [_float32_dtypes(item) for item in config]
    return config


def float32_inference_model(model: keras.Model) -> keras.Model:
    """``model`` rebuilt with every layer under the float32 policy and the same weights (a mixed_float16 model
    keeps float32 variables, so they copy exactly). Returns ``model`` itself when it already computes in float32.

    Exported graphs and ``model.keras`` then compute in float32 on any device, as the bundle manifest says."""
    if all(layer.dtype_policy.compute_dtype == "float32" for layer in _all_layers(model)):
        return model
    config = _float32_dtypes(keras.saving.serialize_keras_object(model))
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")
    try:
        rebuilt = keras.saving.deserialize_keras_object(config)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    rebuilt.set_weights([np.asarray(w, dtype=np.float32) for w in model.get_weights()])
    return rebuilt


def _all_layers(model: keras.Model) -> list:
    layers = []
    for layer in model.layers:
        layers.append(layer)
        if isinstance(layer, keras.Model):
            layers += _all_layers(layer)
    return layers
