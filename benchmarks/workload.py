"""The load test's images, shared by the locustfile (HTTP) and the in-process pipeline (no HTTP), without locust.

Small (256x192 PNG), ~1 MP and ~6 MP photo-like JPEGs generated deterministically, or the files in
``$TRANSFERKIT_LOADTEST_IMAGES``; ``$TRANSFERKIT_LOADTEST_MIX`` weighs the three sizes ("small,1mp,6mp", default
"6,3,1"; "0,1,0" is ~1 MP JPEGs only).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def _picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo (a flat image would make JPEG decoding too cheap)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 120 * np.sin(x / (37 + 11 * c) + y / (53 + 7 * c) + seed) for c in range(3)], -1)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def load_images() -> dict[str, list[tuple[str, bytes, str]]]:
    """Images by kind: ``{kind: [(file name, bytes, content type)]}``."""
    folder = os.environ.get("TRANSFERKIT_LOADTEST_IMAGES")
    if folder:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        return {"files": [(p.name, p.read_bytes(), "image/jpeg") for p in files]}
    return {
        "small": [(f"small{i}.png", _encode(_picture(256, 192, i), "PNG"), "image/png") for i in range(4)],
        "1mp": [(f"1mp{i}.jpg", _encode(_picture(1280, 800, i), "JPEG"), "image/jpeg") for i in range(3)],
        "6mp": [(f"6mp{i}.jpg", _encode(_picture(3000, 2000, i), "JPEG"), "image/jpeg") for i in range(2)],
    }


def mix_weights(kinds: list[str]) -> list[float]:
    """The weight of each kind from ``$TRANSFERKIT_LOADTEST_MIX`` (equal weights for a folder of files)."""
    weights = [float(w) for w in os.environ.get("TRANSFERKIT_LOADTEST_MIX", "6,3,1").split(",")]
    return weights[: len(kinds)] if len(kinds) == 3 else [1.0] * len(kinds)
