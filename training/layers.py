"""Keras layers transferkit puts inside its models (registered, so ``model.keras`` reloads with them)."""

from __future__ import annotations

import keras
from keras import ops

from transferkit.core.backbones import CAFFE_MEAN_BGR, PREPROCESSING_MODES, TORCH_MEAN_RGB, TORCH_STD_RGB


@keras.saving.register_keras_serializable(package="transferkit")
class BackbonePreprocessing(keras.layers.Layer):
    """A backbone's ``preprocess_input`` as a layer, so the model takes plain RGB pixels 0-255.

    Modes match ``keras.applications.imagenet_utils.preprocess_input``: ``caffe`` (RGB->BGR, minus the ImageNet
    mean), ``tf`` (x/127.5 - 1), ``torch`` (x/255, ImageNet mean/std); ``builtin`` passes pixels through because
    the backbone rescales itself (EfficientNet, ConvNeXt, MobileNetV3). Always computes in float32, also under a
    mixed-precision policy, since the ImageNet means lose precision in float16.
    """

    def __init__(self, mode: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {PREPROCESSING_MODES}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(TORCH_MEAN_RGB, "float32")
            std = ops.convert_to_tensor(TORCH_STD_RGB, "float32")
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            # take() becomes one Gather in ONNX; a reversed slice is a strided slice with a negative step.
            bgr = ops.take(x, [2, 1, 0], axis=-1)
            return bgr - ops.convert_to_tensor(CAFFE_MEAN_BGR, "float32")
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
