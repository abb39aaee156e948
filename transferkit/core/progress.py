"""A progress bar with images/s for long batch jobs, drawn by tqdm: redrawn in place on a terminal, a new line every
``interval`` seconds anywhere else (a log file or CI output has no use for carriage returns)."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

# tqdm's own rate field glues the unit on ("12.00images/s", "3.00s/images"): the rate goes in the postfix (_stats).
_WITH_TOTAL = "{l_bar}%s| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]"
_WITHOUT_TOTAL = "{desc}{n_fmt} {unit} [{elapsed}{postfix}]"  # desc: empty, or "text: " (describe)
_LOG_BAR_WIDTH = 24
_NO_TRIM = 10_000  # a column count no line reaches: a log line keeps its counts whatever $COLUMNS says


def _is_terminal(stream: TextIO) -> bool:
    """A terminal with a size: a pseudo-terminal may report 0 columns or rows (``script``, ``docker run -t`` in CI),
    and tqdm then trims every line to nothing or draws none."""
    try:
        return stream.isatty() and min(os.get_terminal_size(stream.fileno())) > 0
    except (AttributeError, OSError, ValueError):  # not a file descriptor (StringIO, a wrapper), or closed
        return False


class _Bar(tqdm):
    """tqdm that writes one line per refresh when ``lines`` is set, instead of redrawing one line in place."""

    monitor_interval = 0  # no monitor thread: with miniters=1 every update past `mininterval` refreshes

    def __init__(self, *args, lines: bool, **kwargs):
        self.lines = lines  # before tqdm's __init__, which draws the first state
        self.shown_n = None  # the count on the last line written
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not self.lines:
            return super().display(msg, pos)
        if msg == "":  # tqdm erasing its bar (close with leave=False): a log keeps its lines
            return False
        self.fp.write((self.__str__() if msg is None else msg) + "\n")
        self.fp.flush()
        self.shown_n = self.n
        return True


class Progress:
    """Counts of done, unreadable and skipped items, shown as a bar with their rate; :meth:`close` draws the final
    state. ``interval`` defaults to 0.2 s on a terminal and 10 s elsewhere; ``enabled=False`` draws nothing (the
    counts are still kept)."""

    def __init__(self, total: int | None, label: str = "images", stream: TextIO | None = None,
                 interval: float | None = None, enabled: bool = True):
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = _is_terminal(self.stream)
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.enabled = enabled
        self.done = 0
        self.errors = 0
        self.skipped = 0
        self.start = time.perf_counter()
        bar = "{bar}" if self.tty else f"{{bar:{_LOG_BAR_WIDTH}}}"
        self._bar = _Bar(
            total=total or None, unit=label, file=self.stream, disable=not enabled, lines=not self.tty,
            mininterval=self.interval, miniters=1, smoothing=0,  # the average rate, as the final line reports
            bar_format=_WITH_TOTAL % bar if total else _WITHOUT_TOTAL, ascii=None if self.tty else True,
            dynamic_ncols=self.tty, ncols=None if self.tty else _NO_TRIM, leave=self.tty,
        )

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def update(self, done: int, errors: int = 0, skipped: int = 0) -> None:
        """Add ``done`` items, of which ``errors`` could not be read and ``skipped`` were not images."""
        self.done += done
        self.errors += errors
        self.skipped += skipped
        self._bar.set_postfix_str(self._stats(), refresh=False)
        self._bar.update(done)  # redraws once `interval` has passed since the last drawing

    def describe(self, text: str) -> None:
        """Show ``text`` before the bar (what is being worked on), drawn now."""
        self._bar.set_description(text)  # tqdm adds ": "

    def write(self, line: str) -> None:
        """Print ``line`` above the bar (on a terminal the bar is erased, then drawn again below it)."""
        if self.tty and self.enabled:
            self._bar.clear()
            self.stream.write(line + "\n")
            self._bar.refresh()
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Draw the final counts and the average rate, and end the bar's line."""
        self._bar.set_postfix_str(self._stats(), refresh=False)
        if self.enabled and not self.tty and self._bar.shown_n != self._bar.n:
            self._bar.refresh()  # leave=False: tqdm's close adds nothing after this last line
        self._bar.close()

    def _stats(self) -> str:
        rate = self.rate
        # Under one per second (a benchmark's backbones), seconds per item say more than "0.0 per second".
        parts = [f"{1 / rate:.1f} s each" if rate < 1 else f"{rate:.1f} {self.label}/s"] if rate > 0 else []
        parts += [f"{self.errors} unreadable"] if self.errors else []
        parts += [f"{self.skipped} non-images skipped"] if self.skipped else []
        return ", ".join(parts)
