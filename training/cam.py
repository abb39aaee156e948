"""Class activation maps (CAM) of a Keras classifier whose head is global average pooling -> dense softmax.

For such a head the map is exact, not an approximation: the class score is the spatial mean of
``M_c(x, y) = sum_k w[k, c] * F_k(x, y)`` (F: the last feature maps, w: the dense layer's kernel) plus the bias, so
``M_c`` says how much each position of the feature map adds to class c (Zhou et al., 2016). Dropout between the
pooling and the dense layer is the identity at inference and does not change that; a hidden dense layer, or a head
that flattens instead of pooling, does: those heads get no map, and :func:`find_cam` says why.

Temperature scaling is folded into the dense kernel (training/calibration.py), so a calibrated model's map is the
uncalibrated one divided by T: the same picture.

The exported graphs compute the map of the top class beside the probabilities (export/convert.py); this module gives
the Keras reference they are validated against, and the maps of the training report.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

SOFTMAX_LAYERS = (keras.layers.Softmax,)
PASS_THROUGH = (keras.layers.Dropout, keras.layers.Identity)


@dataclass(frozen=True)
class CamSource:
    """Where a model's map comes from: ``explainer`` maps the model's input to [its output, the feature maps
    [N, h, w, k]] in one forward pass (the model's own layers and weights), and ``dense`` is the class layer."""

    explainer: keras.Model
    dense: keras.layers.Dense

    @property
    def resolution(self) -> tuple[int, int]:
        features = self.explainer.outputs[1]
        return int(features.shape[1]), int(features.shape[2])

    def kernel(self) -> np.ndarray:
        """The dense kernel [k, C] as float32."""
        return np.asarray(keras.ops.convert_to_numpy(self.dense.kernel), dtype=np.float32)


# The walk below reads Keras 3's graph records (``_keras_history``, ``_inbound_nodes``): Keras has no public API for
# "the call that produced this tensor"; tests/test_explain.py and tests/test_export_foreign.py fail if they change.
def _producer(tensor) -> keras.layers.Layer:
    return tensor._keras_history.operation


def _input_of(tensor):
    """The input of the call that produced ``tensor``: that call's node, not the layer's first (a layer, or a
    nested model, may be called in several graphs, e.g. a model wrapped twice by export/foreign.py)."""
    history = tensor._keras_history
    return history.operation._inbound_nodes[history.node_index].input_tensors[0]


def _is_softmax(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, SOFTMAX_LAYERS):
        return True
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def _pooled_dense(output, softmax_after: bool = False) -> tuple[keras.layers.Dense | None, object, str]:
    """From a graph's output tensor back to (dense layer, the pooled feature map's tensor, why not)."""
    softmax = softmax_after or _is_softmax(_producer(output))
    while isinstance(_producer(output), (keras.layers.Activation, *SOFTMAX_LAYERS)):
        output = _input_of(output)
    dense = _producer(output)
    if not isinstance(dense, keras.layers.Dense):
        return None, None, f"the output comes from {type(dense).__name__} {dense.name!r}, not a dense layer"
    if not (softmax or _is_softmax(dense)):
        return None, None, f"the dense layer {dense.name!r} has no softmax: its outputs are not class probabilities"
    pooled = _input_of(output)
    while isinstance(_producer(pooled), PASS_THROUGH):
        pooled = _input_of(pooled)
    layer = _producer(pooled)
    if isinstance(layer, keras.layers.Dense):
        return None, None, (f"a hidden dense layer ({layer.name!r}) sits between the pooled features and the "
                            f"class scores (e.g. --head flatten, --hidden-units), so no map is exact for this head")
    if not isinstance(layer, keras.layers.GlobalAveragePooling2D) or layer.keepdims \
            or layer.data_format != "channels_last":
        return None, None, (f"the class layer {dense.name!r} reads {type(layer).__name__} {layer.name!r}, not a "
                            f"global average pooling of a feature map (e.g. --head flatten)")
    features = _input_of(pooled)
    if len(features.shape) != 4:
        return None, None, f"the pooled tensor has shape {tuple(features.shape)}, not a feature map [N, h, w, k]"
    return dense, features, ""


def _through_nested(model: keras.Model, called, trailing: list) -> tuple[CamSource | None, str]:
    """The map of a model whose class layer is inside a nested model (``called``: that model's output tensor in
    ``model``'s graph), followed by ``trailing`` softmax layers: transferkit's head (the features enter it), or a
    whole classifier wrapped (export/foreign.py)."""
    inner, entry = _producer(called), _input_of(called)
    dense, pooled, why = _pooled_dense(inner.outputs[0], softmax_after=any(map(_is_softmax, trailing)))
    if dense is None:
        return None, why
    if pooled is inner.inputs[0]:
        return CamSource(keras.Model(model.inputs[0], [model.outputs[0], entry]), dense), ""
    # The features are computed inside ``inner``: its layers again, with the features as a second output, called on
    # the tensor ``inner`` was called on in this graph (the same preprocessing before, the same softmax after).
    scores, features = keras.Model(inner.inputs[0], [inner.outputs[0], pooled])(entry)
    for layer in trailing:
        scores = layer(scores)
    return CamSource(keras.Model(model.inputs[0], [scores, features]), dense), ""


def find_cam(model: keras.Model) -> tuple[CamSource | None, str]:
    """The model's :class:`CamSource`, or None and the reason it has no exact class activation map."""
    output, trailing = model.outputs[0], []
    while isinstance(_producer(output), (keras.layers.Activation, *SOFTMAX_LAYERS)):
        trailing.insert(0, _producer(output))
        output = _input_of(output)
    if isinstance(_producer(output), keras.Model):
        return _through_nested(model, output, trailing)
    dense, features, why = _pooled_dense(model.outputs[0])
    if dense is None:
        return None, why
    return CamSource(keras.Model(model.inputs[0], [model.outputs[0], features]), dense), ""


def class_maps(features: np.ndarray, kernel: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Maps [N, h, w] of ``classes`` [N] from feature maps [N, h, w, k] and the dense kernel [k, C]."""
    weights = kernel[:, np.asarray(classes)].T  # [N, k]
    return np.einsum("nhwk,nk->nhw", np.asarray(features, np.float32), weights, dtype=np.float32)


def keras_maps(source: CamSource, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, C], top-class maps [N, h, w]) of float pixels ``images`` through Keras."""
    kernel = source.kernel()
    probabilities, maps = [], []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start:start + batch_size], np.float32)
        probs, features = (np.asarray(keras.ops.convert_to_numpy(t), np.float32)
                           for t in source.explainer(batch, training=False))
        probabilities.append(probs)
        maps.append(class_maps(features, kernel, probs.argmax(1)))
    return np.concatenate(probabilities), np.concatenate(maps)
