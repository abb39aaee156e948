"""Augmentation is really random: each random layer draws from its own seed stream, reproducibly per --seed."""

from __future__ import annotations

import numpy as np

from transferkit.training.config import AugmentConfig, TrainConfig
from transferkit.training.pipeline import AUGMENT_LAYERS, augmentation, layer_seed


def _flip_and_contrast(seed: int, images: int = 512, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Run the run's augmentation (flip + contrast only) over copies of one image; per image, whether it came out
    flipped and the contrast factor applied."""
    config = TrainConfig(data=".", out=".", seed=seed, augment=AugmentConfig(
        flip="horizontal", rotation=0, shift=0, zoom=0, contrast=0.5))
    layers = augmentation(config)
    # A horizontal ramp 100..150 in every channel: flipping reverses it; contrast scales it around its mean and
    # never reaches the clip limits (0, 255).
    ramp = np.linspace(100, 150, 16, dtype=np.float32)
    image = np.broadcast_to(ramp[None, :, None], (16, 16, 3)).astype(np.float32)
    flipped, factors = [], []
    for _ in range(images // batch):
        out = np.asarray(layers(np.repeat(image[None], batch, axis=0), training=True))
        profile = out.mean(axis=(1, 3))  # column means, per image
        flipped += list(profile[:, 0] > profile[:, -1])
        factors += list(out.std(axis=(1, 2, 3)) / image.std())
    return np.asarray(flipped, dtype=np.float64), np.asarray(factors)


def test_flip_and_contrast_are_uncorrelated():
    """With one shared seed, "was flipped" tracked the contrast factor at r = -0.875; the layers must be
    independent: |r| < 0.15 over 512 images (the standard error of r at 512 is 0.044)."""
    flipped, factors = _flip_and_contrast(seed=42)
    assert 0.35 < flipped.mean() < 0.65  # both augmentations really vary
    assert factors.std() > 0.1
    r = float(np.corrcoef(flipped, factors)[0, 1])
    assert abs(r) < 0.15, r


def test_augmentation_is_reproducible_per_seed():
    first, again, other = _flip_and_contrast(7, 64), _flip_and_contrast(7, 64), _flip_and_contrast(8, 64)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_allclose(first[1], again[1])
    assert not np.allclose(first[1], other[1])


def test_layer_seeds_are_distinct_and_stable():
    seeds = [layer_seed(42, name) for name in AUGMENT_LAYERS]
    assert len(set(seeds)) == len(seeds)
    assert seeds == [layer_seed(42, name) for name in AUGMENT_LAYERS]
    assert seeds != [layer_seed(43, name) for name in AUGMENT_LAYERS]
