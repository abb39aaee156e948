"""Classify image files with transferkit's ``POST /predict``, using httpx.

    pip install httpx
    python predict_httpx.py http://127.0.0.1:3000 photo.jpg other.png --top-k 3

Each image is one ``images`` file field of a multipart form; ``top_k`` (1 to the number of classes) asks for that
many labels per image instead of the server's TRANSFERKIT_TOP_K. A refusal is JSON ``{"error", "reason"}``; a 503 or
429 with ``Retry-After`` is worth retrying after that many seconds, which :func:`predict` does a few times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import httpx


class Refused(Exception):
    """The server's refusal: its status, machine-readable reason and message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def predict(client: httpx.Client, images: list[tuple[str, bytes]], top_k: int | None = None,
            retries: int = 3) -> list[dict]:
    """``[{"label", "score", "top_k": [{"label", "score"}, ...]}]``, one per ``(file name, bytes)`` in order.

    ``client`` carries the server's address (``base_url``) and, where the server wants one, the bearer token."""
    files = [("images", (name, data, "application/octet-stream")) for name, data in images]
    params = {"top_k": str(top_k)} if top_k is not None else None
    for attempt in range(retries + 1):
        response = client.post("/predict", files=files, params=params)
        retry_after = response.headers.get("Retry-After")
        if response.status_code in (429, 503) and retry_after and attempt < retries:
            time.sleep(float(retry_after))  # the server says when it can take the request
            continue
        break
    if response.status_code != 200:
        error = response.json()
        raise Refused(response.status_code, error["reason"], error["error"])
    return response.json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:3000")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top-k", type=int, default=None, help="labels per image (default: the server's)")
    args = parser.parse_args(argv)
    token = os.environ.get("TRANSFERKIT_API_TOKEN")  # only where the server is protected
    headers = {"Authorization": f"Bearer {token}"} if token else None
    images = [(path.name, path.read_bytes()) for path in args.files]
    with httpx.Client(base_url=args.url, headers=headers, timeout=60) as client:
        try:
            answers = predict(client, images, args.top_k)
        except Refused as refusal:
            print(refusal, file=sys.stderr)
            return 1
    for (name, _), answer in zip(images, answers):
        labels = ", ".join(f"{item['label']} {item['score']:.3f}" for item in answer["top_k"])
        print(f"{name}: {answer['label']} ({labels})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
