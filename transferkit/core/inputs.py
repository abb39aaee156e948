"""What ``transferkit predict`` reads: image files, directories, globs and text/CSV lists of paths, as one stream.

Every argument becomes a sequence of :class:`Item` (a path and whether the user named it). Files the user named
(directly or in a list) are always attempted: a bad one becomes a row with an error. Files found by walking a
directory or matching a glob are *candidates*: their format is sniffed from their first bytes when they are read,
and those that are not images (a README, a ``.DS_Store``) are skipped and listed, not reported as errors.

Nothing here opens an image: the directory walk is lazy (``os.scandir``), so listing a million-file archive costs
the file names only.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from transferkit.core.atomic import MARKER
from transferkit.core.errors import UsageError
from transferkit.core.outputs import stored_path

LIST_SUFFIXES = frozenset({".txt", ".csv", ".lst", ".list", ".tsv"})
CSV_PATH_COLUMNS = ("path", "file", "filename", "image", "filepath")
GLOB_CHARACTERS = frozenset("*?[")

# Magic numbers of the formats decode_image accepts (JPEG, PNG, BMP, GIF, WebP): enough to tell an image from a
# text file without decoding anything. decode_image still checks everything properly.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF87a", b"GIF89a")


class Item(NamedTuple):
    """One file to classify; ``named`` is False for files found in a directory or by a glob (sniffed, may be
    skipped as a non-image)."""

    path: str
    named: bool


def looks_like_image(head: bytes) -> bool:
    """Whether the first bytes of a file are those of a JPEG, PNG, BMP, GIF or WebP."""
    if head.startswith(_MAGIC):
        return True
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def _walk(directory: Path) -> Iterator[str]:
    """Regular files under ``directory``, recursively, in a stable (sorted) order; hidden folders are left out."""
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError as exc:
        raise UsageError(f"cannot list {directory}: {exc.strerror}") from None
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if not entry.name.startswith("."):  # .git, .ipynb_checkpoints, .thumbnails...
                yield from _walk(Path(entry.path))
        elif entry.is_file() and entry.name != MARKER:  # the marker of a folder transferkit wrote is no input
            yield entry.path


def _read_list(path: Path) -> Iterator[str]:
    """Paths in a text list (one per line, ``#`` comments) or a CSV (a ``path``/``file``/... column, else the first
    column). Relative paths are relative to the list's folder. A name that is not UTF-8 is read back from its
    ``\\xNN`` escapes (how predict's outputs write it), so an output can be a later run's list."""
    base = path.parent
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            if path.suffix.lower() in (".csv", ".tsv"):
                reader = csv.reader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                first = next(reader, None)
                if first is None:
                    return
                lowered = [cell.strip().lower() for cell in first]
                column = next((lowered.index(name) for name in CSV_PATH_COLUMNS if name in lowered), None)
                rows: Iterable[list[str]] = reader
                if column is None:  # no header: the first column of every row, the first row included
                    column, rows = 0, [first, *reader]
                for row in rows:
                    if len(row) > column and row[column].strip():
                        yield stored_path(str(base / row[column].strip()))
            else:
                for line in handle:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        yield stored_path(str(base / line))
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text list of paths (not UTF-8)") from None


def _is_list_file(path: Path) -> bool:
    if path.suffix.lower() not in LIST_SUFFIXES:
        return False
    with path.open("rb") as handle:
        return not looks_like_image(handle.read(16))


def expand_inputs(arguments: Iterable[str | os.PathLike]) -> Iterator[Item]:
    """Every file named by ``arguments`` (files, directories, globs, text/CSV lists), once each, in order.

    Raises UsageError for an argument that names nothing (no file, directory or glob match).
    """
    seen: set[str] = set()  # a file named twice (a folder and one of its files) is classified once

    def once(path: str, named: bool) -> Iterator[Item]:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            yield Item(path, named)

    for argument in arguments:
        text = os.fspath(argument)
        path = Path(text)
        if path.is_dir():
            for found in _walk(path):
                yield from once(found, False)
        elif path.is_file():
            if _is_list_file(path):
                for listed in _read_list(path):
                    yield from once(listed, True)
            else:
                yield from once(text, True)
        elif GLOB_CHARACTERS & set(text):
            matches = sorted(glob.iglob(text, recursive=True))
            if not matches:
                raise UsageError(f"{text}: no file matches this pattern")
            for match in matches:
                if Path(match).is_dir():
                    continue
                yield from once(match, False)
        else:
            raise UsageError(f"{text}: no such file, directory or glob match")
