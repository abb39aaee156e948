"""The results summary every command ends with: labelled rows, aligned, one per line."""

from __future__ import annotations

from collections.abc import Sequence


def print_summary(rows: Sequence[tuple[str, str]], title: str | None = "summary") -> None:
    """Print ``rows`` as ``  label  value`` lines with the labels padded to one width, under ``title``."""
    if title:
        print(f"\n{title}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
