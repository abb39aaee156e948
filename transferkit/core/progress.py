"""A one-line progress bar on stderr with images/s, for long batch jobs (redrawn on a terminal, a line every
``interval`` seconds in logs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int | None, label: str = "images", stream: TextIO | None = None,
                 interval: float | None = None, enabled: bool = True):
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.enabled = enabled
        self.done = 0
        self.errors = 0
        self.skipped = 0
        self.start = time.perf_counter()
        self._last = 0.0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def update(self, done: int, errors: int = 0, skipped: int = 0) -> None:
        self.done += done
        self.errors += errors
        self.skipped += skipped
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(final=False)

    def _draw(self, final: bool) -> None:
        rate = self.rate
        if self.total:
            share = min(1.0, self.done / self.total)
            filled = int(share * 24)
            bar = f"[{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total} {self.label}"
            left = (self.total - self.done) / rate if rate > 0 else 0
            eta = f", {left:.0f} s left" if not final and rate > 0 else ""
        else:
            bar, eta = f"{self.done} {self.label}", ""
        extra = f", {self.errors} unreadable" if self.errors else ""
        extra += f", {self.skipped} non-images skipped" if self.skipped else ""
        line = f"{bar}  {rate:.1f} {self.label}/s{extra}{eta}"
        if self.tty:
            self.stream.write("\r" + line.ljust(100) + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(final=True)
