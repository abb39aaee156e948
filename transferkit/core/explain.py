"""Class activation maps as people look at them: a heat map over the image the model saw, as PNG, or as JSON.

A bundle's graphs output the top class's map at the feature map's resolution (``manifest.explain``; how it is made:
training/cam.py). Shown, it is normalised as the CAM paper does: negative evidence set to 0, the rest divided by its
maximum, then upsampled bilinearly to the image and blended over it in a blue-to-red colour scale. Numpy and Pillow
only: no matplotlib in the runtime.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

# A perceptually ordered blue -> cyan -> yellow -> red scale (value 0 to 1), the anchors of "turbo"-like maps.
_ANCHORS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[48, 18, 59], [40, 150, 240], [160, 250, 60], [250, 160, 30], [122, 4, 3]], dtype=np.float32)
ALPHA = 0.5  # the map's share of each blended pixel
MIN_SIDE = 224  # overlays of small model inputs are enlarged to at least this, so that a person can see them


def normalized(cam: np.ndarray) -> np.ndarray:
    """[h, w] map -> [0, 1]: positive evidence over its maximum (all zeros when nothing is positive)."""
    positive = np.maximum(np.asarray(cam, np.float32), 0.0)
    top = float(positive.max()) if positive.size else 0.0
    return positive / top if top > 0 else np.zeros_like(positive)


def colourized(values: np.ndarray) -> np.ndarray:
    """[H, W] values in [0, 1] -> uint8 RGB [H, W, 3]."""
    flat = np.clip(values, 0.0, 1.0).ravel()
    channels = [np.interp(flat, _ANCHORS, _COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=1).reshape(*values.shape, 3).astype(np.uint8)


def overlay(pixels: np.ndarray, cam: np.ndarray):
    """A PIL image: the map upsampled over ``pixels`` (uint8 RGB [S, S, 3], the model's input), enlarged to at
    least :data:`MIN_SIDE` px."""
    from PIL import Image

    image = Image.fromarray(np.asarray(pixels, np.uint8), "RGB")
    side = max(MIN_SIDE, image.width)
    image = image.resize((side, side), Image.Resampling.BICUBIC) if side != image.width else image
    heat = Image.fromarray(normalized(cam), "F").resize(image.size, Image.Resampling.BILINEAR)
    coloured = Image.fromarray(colourized(np.asarray(heat)), "RGB")
    return Image.blend(image, coloured, ALPHA)


def overlay_png(pixels: np.ndarray, cam: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    overlay(pixels, cam).save(buffer, format="PNG")
    return buffer.getvalue()


def cam_payload(cam: np.ndarray) -> dict:
    """The map as JSON: its raw values (the top class's logit contribution per position) and the normalised ones."""
    raw = np.asarray(cam, np.float32)
    return {"resolution": list(raw.shape), "values": np.round(raw, 6).tolist(),
            "normalized": np.round(normalized(raw), 4).tolist()}


def overlay_path(root: Path, source: str) -> Path:
    """Where ``transferkit predict --explain ROOT`` writes the overlay of ``source``: ROOT, then the file's path
    relative to the working directory (outside it: its absolute path without the leading separator), then
    ``.cam.png``; so inputs of the same name in different folders never overwrite each other."""
    path = Path(os.path.abspath(source))
    try:
        relative = path.relative_to(Path.cwd())
    except ValueError:
        relative = path.relative_to(path.anchor)
    return root / relative.with_name(relative.name + ".cam.png")


def write_overlay(root: Path, source: str, pixels: np.ndarray, cam: np.ndarray) -> None:
    target = overlay_path(root, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(overlay_png(pixels, cam))
