"""Temperature scaling (Guo et al. 2017): one scalar T fitted on the validation split by minimising the NLL of
softmax(log p / T), then folded into the head's final Dense layer (kernel and bias divided by T), so that
``model.keras`` and every exported format output calibrated probabilities with no extra layer or op.

softmax(z / T) with z = W x + b equals softmax((W / T) x + b / T), and log p differs from z by a per-image constant,
so the fit on probabilities and the fold into the weights agree; T > 0 never changes the argmax.
Numpy only (the fit); :func:`fold_temperature` touches the Keras model.
"""

from __future__ import annotations

import math

import numpy as np

MIN_VALIDATION_IMAGES = 20
LOG_T_RANGE = (-3.0, 3.0)  # T in [0.05, 20]
PROBABILITY_FLOOR = 1e-30


def _log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probabilities, np.float64), PROBABILITY_FLOOR))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities a model with logits divided by T gives (T = 1: unchanged)."""
    z = _log_probabilities(probabilities) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(log_p: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = log_p / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_softmax[np.arange(len(labels)), labels].mean())


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray, tolerance: float = 1e-5) -> float:
    """The T minimising the NLL of softmax(log p / T) on (probabilities, labels): golden-section search over log T
    in :data:`LOG_T_RANGE` (the NLL is convex in 1/T)."""
    log_p = _log_probabilities(probabilities)
    labels = np.asarray(labels, np.int64)

    def loss(log_t: float) -> float:
        return _nll(log_p, labels, math.exp(log_t))

    ratio = (math.sqrt(5) - 1) / 2
    a, b = LOG_T_RANGE
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > tolerance:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return float(math.exp((a + b) / 2))


def boundary_reason(temperature: float, margin: float = 1e-3) -> str | None:
    """Why a fitted T is not used, when the search ended at an end of :data:`LOG_T_RANGE`: the NLL kept falling
    towards it, so T is set by the range, not the data (e.g. every validation image is right with a margin: the NLL
    falls towards 0 as T -> 0, and such a T would make every answer, wrong ones too, near-certain)."""
    log_t = math.log(temperature)
    low, high = LOG_T_RANGE
    if log_t - low < margin or high - log_t < margin:
        end = "0" if log_t - low < margin else "infinity"
        return (f"the validation NLL has no minimum inside T in [{math.exp(low):.3g}, {math.exp(high):.3g}]: it keeps "
                f"falling as T goes to {end} (fitted {temperature:.4g}; e.g. a validation split classified right "
                "with a margin throughout), so the temperature is not identifiable from it")
    return None


def final_dense(model):
    """The layer whose logits the softmax reads: the head's Dense ``probabilities`` with a softmax activation, or
    None when the model has none (a model transferkit did not build)."""
    import keras

    try:
        layer = model.get_layer("head").get_layer("probabilities")
    except (ValueError, AttributeError):
        return None
    if not isinstance(layer, keras.layers.Dense) or getattr(layer.activation, "__name__", "") != "softmax":
        return None
    return layer


def fold_temperature(model, temperature: float) -> None:
    """Divide the final Dense layer's kernel and bias by T, in place (see the module docstring)."""
    layer = final_dense(model)
    if layer is None:
        raise ValueError("the model has no head Dense layer 'probabilities' with a softmax to fold T into")
    weights = layer.get_weights()
    layer.set_weights([np.asarray(w, np.float32) / np.float32(temperature) for w in weights])


def skip_reason(model, val_images: int, enabled: bool) -> str | None:
    """Why calibration is not applied, or None when it is."""
    if not enabled:
        return "turned off (--no-calibrate)"
    if val_images < MIN_VALIDATION_IMAGES:
        return (f"the validation split has {val_images} image(s), fewer than {MIN_VALIDATION_IMAGES}: "
                "too few to fit a temperature")
    if final_dense(model) is None:
        return "the model has no final softmax Dense layer to fold a temperature into"
    return None
