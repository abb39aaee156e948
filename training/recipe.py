"""The training recipe: optimizer, learning-rate schedule, loss, class weights and early stopping.

Defaults follow current fine-tuning practice: AdamW (decoupled weight decay), a linear warm-up into a cosine decay
to zero over each phase's epoch budget (warm-up protects pretrained features from the first, large, noisy updates
of a randomly initialised head), label smoothing 0.1, and optional balanced class weights.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from transferkit.training.config import TrainConfig


def learning_rate_schedule(config: TrainConfig, peak: float, epochs: int, steps_per_epoch: int):
    """``peak`` constant, or linear warm-up from 0 over ``config.warmup_epochs`` then cosine decay to 0 at the end
    of the phase's budget (at most half the budget is warm-up)."""
    import keras

    if config.schedule == "constant":
        return peak
    total = max(1, epochs * steps_per_epoch)
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total // 2)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(peak, total)
    return keras.optimizers.schedules.CosineDecay(0.0, total - warmup, warmup_target=peak, warmup_steps=warmup)


def optimizer(config: TrainConfig, learning_rate):
    import keras

    name = config.optimizer
    if name == "adamw":
        return learning_rate_once_per_step(keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay))
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=config.momentum)
    if name == "nadam":
        return keras.optimizers.Nadam(learning_rate)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    return learning_rate_once_per_step(keras.optimizers.Adam(learning_rate))


def learning_rate_once_per_step(optimizer):
    """``optimizer``, evaluating its learning-rate schedule once per training step instead of once per variable.

    Keras's TensorFlow optimizers read ``learning_rate`` for every variable they apply weight decay to, and a warm-up
    CosineDecay is a ``cond``: AdamW's train step for MobileNetV2 traced 159 of them. Measured on the demo's network
    (two cores): the first batch of a fit came after 29.5 s, 17.0 s with this. Inside ``apply`` every reader gets the
    one value computed when the step began, before the iteration counter moves, which is the value each of them
    computed before: the updates are bitwise the same (tested).

    The instance keeps its class, so ``model.keras`` still names a plain Keras optimizer and loads without
    transferkit. Per thread, because MirroredStrategy runs one replica per thread. (Tried and not kept: Adam's
    per-variable update as TensorFlow's fused ``ResourceApplyAdam``, another ~8 s per fit; its float32 rounding
    differs by an ulp per step, and the demo's results moved with it.)
    """
    import keras

    if not isinstance(optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        return optimizer  # a constant or a variable is cheap to read
    compute, apply = optimizer._get_current_learning_rate, optimizer.apply
    step = threading.local()

    def current_learning_rate():
        value = getattr(step, "learning_rate", None)
        return compute() if value is None else value

    def apply_with_one_learning_rate(grads, trainable_variables=None):
        step.learning_rate = compute()
        try:
            return apply(grads, trainable_variables)
        finally:
            step.learning_rate = None

    optimizer._get_current_learning_rate = current_learning_rate
    optimizer.apply = apply_with_one_learning_rate
    return optimizer


def loss(config: TrainConfig):
    import keras

    return keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)


def compile_for_training(model, config: TrainConfig, learning_rate) -> None:
    """Compile ``model`` with the recipe's optimizer, loss and accuracy metric, with every variable created now.

    Keras otherwise creates the optimizer slots and the "accuracy" metric's counters inside the first traced
    train step; a tf.function that creates variables is traced twice, which costs MobileNetV2 about 16 s per fit
    on two cores (measured: first epoch 28.3 s -> 12.5 s). Fits are repeated per phase, so this adds up."""
    import keras

    model.compile(optimizer=optimizer(config, learning_rate), loss=loss(config),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    with model.distribute_strategy.scope():
        model.optimizer.build(model.trainable_variables)


def class_weights(config: TrainConfig, labels: np.ndarray, num_classes: int) -> dict[int, float] | None:
    """``balanced``: n / (classes x count) per class (scikit-learn's definition); None otherwise."""
    if config.class_weight != "balanced":
        return None
    counts = np.bincount(labels, minlength=num_classes)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return {i: float(w) for i, w in enumerate(weights)}


def steps_per_epoch(samples: int, batch_size: int) -> int:
    return max(1, math.ceil(samples / batch_size))


def current_learning_rate(model) -> float:
    import keras

    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
