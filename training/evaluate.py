"""Batched inference without ``model.predict()`` and the test metrics computed with scikit-learn."""

from __future__ import annotations

import weakref

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


_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def batched_forward(model: keras.Model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run ``model`` over uint8 or float images (an array, or rows of the image cache) in batches; returns a
    float32 numpy array. The traced function is kept per model and input shape, so repeated calls do not
    retrace."""
    shape = tuple(images.shape[1:])
    per_model = _FORWARDS.setdefault(model, {})
    if shape not in per_model:
        per_model[shape] = make_forward(model, shape)
    forward = per_model[shape]
    outputs = [
        forward(tf.convert_to_tensor(images[i : i + batch_size], tf.float32)).numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs).astype(np.float32)
