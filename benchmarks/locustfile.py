"""Locust users for the transferkit service: real JPEG/PNG uploads of several sizes, every answer validated.

    locust -f benchmarks/locustfile.py --host http://127.0.0.1:3000

Images: small (256x192 PNG), ~1 MP and ~6 MP JPEG photos-like pictures generated at start-up (or the files in
$TRANSFERKIT_LOADTEST_IMAGES). Weights are set by $TRANSFERKIT_LOADTEST_MIX ("small,1mp,6mp", default "6,3,1").
Overload answers (429/503) are reported under their own name, not as failures; a low-weight task sends bad input
that must be answered 4xx.
"""

from __future__ import annotations

import io
import math
import os
import random
from pathlib import Path

import numpy as np
from locust import HttpUser, between, task
from PIL import Image

OVERLOAD = (429, 503)


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
    folder = os.environ.get("TRANSFERKIT_LOADTEST_IMAGES")
    if folder:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        return {"files": [(p.name, p.read_bytes(), "image/jpeg") for p in files]}
    return {
        "small": [(f"small{i}.png", _encode(_picture(256, 192, i), "PNG"), "image/png") for i in range(4)],
        "1mp": [(f"1mp{i}.jpg", _encode(_picture(1280, 800, i), "JPEG"), "image/jpeg") for i in range(3)],
        "6mp": [(f"6mp{i}.jpg", _encode(_picture(3000, 2000, i), "JPEG"), "image/jpeg") for i in range(2)],
    }


IMAGES = load_images()
_weights = [float(w) for w in os.environ.get("TRANSFERKIT_LOADTEST_MIX", "6,3,1").split(",")]
KINDS = list(IMAGES)
WEIGHTS = _weights[: len(KINDS)] if len(KINDS) == 3 else [1.0] * len(KINDS)


def check_answer(answer: list, classes: list[str], count: int) -> str | None:
    """Why a 200 answer is wrong, or None."""
    if not isinstance(answer, list) or len(answer) != count:
        return f"expected a list of {count} answers"
    for item in answer:
        scores = [entry["score"] for entry in item.get("top_k", [])]
        if item.get("label") not in classes:
            return f"label {item.get('label')!r} is not a class"
        if not scores or not all(isinstance(s, float) and math.isfinite(s) and 0 <= s <= 1 for s in scores):
            return "scores must be finite probabilities"
        if scores != sorted(scores, reverse=True) or sum(scores) > 1.001:
            return "top_k must be sorted and sum to at most 1"
        if len(classes) <= len(scores) and abs(sum(scores) - 1) > 1e-3:
            return f"probabilities sum to {sum(scores):.4f}, not 1"
    return None


class ImageClient(HttpUser):
    wait_time = between(0, 0.01)

    def on_start(self) -> None:
        self.classes = self.client.get("/metadata", name="/metadata").json()["classes"]

    @task(20)
    def predict(self) -> None:
        kind = random.choices(KINDS, WEIGHTS)[0]
        name, data, content_type = random.choice(IMAGES[kind])
        with self.client.post("/predict", files=[("images", (name, data, content_type))], name=f"/predict {kind}",
                              catch_response=True) as response:
            if response.status_code in OVERLOAD:
                response.request_meta["name"] = f"overloaded {response.status_code}"
                response.success()
            elif response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            else:
                problem = check_answer(response.json(), self.classes, 1)
                if problem:
                    response.failure(problem)

    @task(1)
    def bad_input(self) -> None:
        with self.client.post("/predict", files=[("images", ("bad.jpg", b"not an image" * 10, "image/jpeg"))],
                              name="bad input (expects 4xx)", catch_response=True) as response:
            if response.status_code in OVERLOAD:
                response.request_meta["name"] = f"overloaded {response.status_code}"
                response.success()
            elif 400 <= response.status_code < 500 and "error" in response.json():
                response.success()
            else:
                response.failure(f"bad input answered HTTP {response.status_code}")
