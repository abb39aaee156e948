"""Batched inference without ``model.predict()`` and the test metrics computed with scikit-learn."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def make_forward(model: keras.Model, input_shape: tuple[int, ...]):
    """A compiled inference function with a fixed signature (one trace, whatever the batch size)."""
    spec = tf.TensorSpec((None, *input_shape), tf.float32)

    @tf.function(input_signature=[spec], reduce_retracing=True)
    def forward(x):
        return model(x, training=False)

    return forward


def batched_forward(model: keras.Model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run ``model`` over uint8 or float images in batches; returns a float32 numpy array."""
    forward = make_forward(model, images.shape[1:])
    outputs = [
        forward(tf.convert_to_tensor(images[i : i + batch_size], tf.float32)).numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs).astype(np.float32)
