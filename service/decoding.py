"""Decoding bounded in concurrency and memory, per worker process.

One 49-megapixel 16-bit PNG costs about 1.3 GB to decode (measured: Pillow's 16-bit buffer plus the float rescale
to 8 bit), and nothing else limited how many decode at once. Before any pixel is decoded, each image's peak decode
memory is estimated from its header (mode, size and, for JPEG, the DCT scale the decoder will use); a request is
admitted only when a decode slot is free (``decode_concurrency``) and its estimate fits in what is left of the
worker's budget (``decode_memory_mb``). An image whose estimate alone exceeds the budget is refused (413); a request
that cannot get a slot within half its timeout is answered 503 ``busy`` (retryable), never 504 or an OOM kill.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np

from transferkit.core.errors import InvalidImageError, ServiceError
from transferkit.core.images import decode_image, open_image_header

# Peak bytes per decoded pixel by Pillow mode, measured on 49 MP images (RSS peak over the decode): 16-bit and
# float images go through float64 arrays; 8-bit colour is held as 4 bytes per pixel, twice (decode, then RGB).
BYTES_PER_PIXEL = {"I;16": 26, "I;16B": 26, "I;16L": 26, "I;16N": 26, "I": 26, "F": 26, "1": 5, "L": 5,
                   "P": 9, "PA": 9, "LA": 8, "RGB": 8, "RGBA": 8, "RGBX": 8, "CMYK": 8, "YCbCr": 8}
OVERHEAD_BYTES = 4 * 1024 * 1024  # decoder tables, the resized output, the stacked batch


def estimate_decode_bytes(data: bytes, side: int, max_pixels: int) -> int:
    """Peak memory to decode ``data`` to ``side``² from its header only; raises InvalidImageError for bad input."""
    image = open_image_header(data, max_pixels=max_pixels)
    width, height = image.size
    if image.format == "JPEG":
        scale = 1  # Image.draft picks the largest 1/2, 1/4, 1/8 reduction that still covers the target
        while scale < 8 and width // (scale * 2) >= side and height // (scale * 2) >= side:
            scale *= 2
        width, height = math.ceil(width / scale), math.ceil(height / scale)
    return width * height * BYTES_PER_PIXEL.get(image.mode, 26) + OVERHEAD_BYTES


class DecodeGate:
    """At most ``slots`` requests decoding at once, and at most ``budget`` estimated bytes among them, admitted in
    arrival order: a request that arrives while others wait queues behind them even if it would fit now. Without
    that, a new arrival could take a slot freed for a waiter, again and again: in the ``inprocess`` layout this gate
    is the queue for the compute threads, and under overload such barging left a few requests waiting 3x the median
    (BENCHMARKS.md, "Overload")."""

    def __init__(self, slots: int, budget: int):
        self.slots, self.budget = slots, budget
        self.busy_slots = 0
        self.busy_bytes = 0
        self._changed: asyncio.Condition | None = None  # made inside the worker's event loop
        self._issued = 0  # tickets handed out, in arrival order
        self._serving = 0  # the ticket whose turn it is
        self._abandoned: set[int] = set()  # tickets whose request gave up waiting (timeout, disconnect)

    def _fits(self, cost: int) -> bool:
        return self.busy_slots < self.slots and self.busy_bytes + cost <= self.budget

    def _next_turn(self) -> None:
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1

    @asynccontextmanager
    async def admit(self, cost: int, wait_s: float) -> AsyncIterator[None]:
        if cost > self.budget:
            raise ServiceError(413, "image_too_large",
                               f"image too large to decode here: it needs about {cost / 2**20:.0f} MiB, the "
                               f"per-worker decode budget is {self.budget / 2**20:.0f} MiB")
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            ticket, self._issued = self._issued, self._issued + 1
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._serving == ticket and self._fits(cost)), wait_s)
            except BaseException as exc:  # a timeout, or the client gone: the queue moves past this ticket
                if self._serving == ticket:
                    self._next_turn()
                else:
                    self._abandoned.add(ticket)
                self._changed.notify_all()
                if isinstance(exc, TimeoutError):
                    raise ServiceError(503, "busy", "the server is decoding as many large images as it can "
                                                    "hold; retry shortly", retry_after=1) from None
                raise
            self._next_turn()
            self.busy_slots += 1
            self.busy_bytes += cost
            self._changed.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            async with self._changed:
                self.busy_slots -= 1
                self.busy_bytes -= cost
                self._changed.notify_all()


def estimate_all(images: list[tuple[str, bytes]], side: int, max_pixels: int) -> int:
    """The largest single-image estimate (a request's images decode one after another)."""
    worst = 0
    for name, data in images:
        try:
            worst = max(worst, estimate_decode_bytes(data, side, max_pixels))
        except InvalidImageError as exc:
            raise ServiceError(exc.http_status, exc.reason, f"{name}: {exc}") from None
    return worst


def decode_all(images: list[tuple[str, bytes]], side: int, max_pixels: int) -> np.ndarray:
    """Decode every image with the guarded decoder training uses; uint8 [N, side, side, 3]."""
    pixels = []
    for name, data in images:
        try:
            pixels.append(decode_image(data, side, max_pixels=max_pixels))
        except InvalidImageError as exc:
            raise ServiceError(exc.http_status, exc.reason, f"{name}: {exc}") from None
    return np.stack(pixels)
