"""The preprocessing block transferkit puts in front of a backbone, built from standard Keras layers.

:func:`preprocessing_block` uses only built-in layers (Rescaling, Normalization, a fixed Dense for the BGR swap),
so ``model.keras`` loads with plain ``keras.models.load_model`` in a process that never imported transferkit.
"""

from __future__ import annotations

import keras
import numpy as np

from transferkit.core.backbones import CAFFE_MEAN_BGR, PREPROCESSING_MODES, TORCH_MEAN_RGB, TORCH_STD_RGB


def preprocessing_block(mode: str, name: str = "preprocessing") -> keras.Sequential:
    """The backbone's ``preprocess_input`` as a nested Sequential of standard Keras layers (always float32: the
    ImageNet means lose precision in float16). Takes RGB 0-255."""
    if mode not in PREPROCESSING_MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {PREPROCESSING_MODES}")
    if mode == "tf":
        layers = [keras.layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32", name=f"{name}_rescale")]
    elif mode == "torch":
        # (x/255 - mean) / std == (x - 255 mean) / (255 std)
        mean = [255.0 * m for m in TORCH_MEAN_RGB]
        variance = [(255.0 * s) ** 2 for s in TORCH_STD_RGB]
        layers = [keras.layers.Normalization(mean=mean, variance=variance, dtype="float32",
                                             name=f"{name}_normalize")]
    elif mode == "caffe":
        # RGB -> BGR and minus the BGR mean as one fixed 3x3 linear map: exact in float32 (0/1 weights).
        layers = [keras.layers.Dense(3, trainable=False, dtype="float32", name=f"{name}_bgr_minus_mean")]
    else:
        layers = [keras.layers.Identity(dtype="float32", name=f"{name}_builtin")]
    block = keras.Sequential(layers, name=name)
    block.build((None, None, None, 3))
    if mode == "caffe":
        swap = np.zeros((3, 3), np.float32)
        swap[2, 0] = swap[1, 1] = swap[0, 2] = 1.0
        layers[0].set_weights([swap, -np.asarray(CAFFE_MEAN_BGR, np.float32)])
    return block
