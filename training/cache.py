"""The decoded-image cache: every image decoded once, with the guarded decoder, into one uint8 file on disk.

Layout: ``<cache root>/<dataset key>/<fingerprint>/`` holds ``pixels.u8`` (row ``i`` = file ``i`` of ``index.json``,
``size x size x 3`` bytes; the rows of unreadable files stay zero) and ``index.json`` (the files, their byte size and
modification time, and why a file was skipped). The dataset key is the dataset root and the image size; the
fingerprint covers every file's path, size and mtime and the Pillow version, so a changed folder gets a new entry
and an unchanged one is reused. A rebuild copies the rows of unchanged files from the previous entry instead of
decoding them again, then removes that entry.

Rows are read with ``pread`` into fresh buffers rather than memory-mapped: mapped pages count towards a process's
resident memory, so an epoch over a memory-mapped cache would grow RSS with the dataset size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.core.errors import InvalidImageError
from transferkit.core.images import decode_image
from transferkit.core.system import available_cores, default_cache_root

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
PIXELS, INDEX = "pixels.u8", "index.json"
Progress = Callable[[int, int], None]


class PixelStore:
    """Read-only access to the rows of a ``pixels.u8`` file, thread-safe (positional reads)."""

    def __init__(self, path: Path, count: int, size: int):
        self.path, self.count, self.size = Path(path), count, size
        self.row_bytes = size * size * 3
        self._fd = -1
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.size, self.size, 3), np.uint8)
        for i, row in enumerate(rows.tolist()):
            if not 0 <= row < self.count:
                raise IndexError(f"row {row} outside the cache's {self.count} rows")
            view = memoryview(out[i]).cast("B")
            if os.preadv(self._fd, [view], row * self.row_bytes) != self.row_bytes:
                raise OSError(f"{self.path} is truncated at row {row}")
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class PixelRows:
    """Some rows of a :class:`PixelStore`, indexed like a ``(N, H, W, 3)`` uint8 array (int, slice, index array);
    every access reads from disk, so holding one costs no image memory."""

    def __init__(self, store: PixelStore, rows: np.ndarray):
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.dtype = np.dtype(np.uint8)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.store.size, self.store.size, 3)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.store.read([self.rows[key]])[0]
        return self.store.read(self.rows[key])

    def __array__(self, dtype=None, copy=None):
        pixels = self.store.read(self.rows)
        return pixels if dtype is None else pixels.astype(dtype)


@dataclass
class CacheEntry:
    """A complete cache entry for one listing of a dataset at one size."""

    directory: Path
    files: list[str]  # relative paths, row order
    skipped: dict[str, str]  # relative path -> reason it could not be decoded
    store: PixelStore
    reused: int  # rows taken from an earlier entry or this one (0: everything decoded now)
    decoded: int  # rows decoded by this call


def _pillow_version() -> str:
    import PIL

    return PIL.__version__


def _listing(root: Path, paths: list[Path]) -> list[tuple[str, int, int]]:
    """(path relative to the absolute ``root``, size, mtime) of each file; ``paths`` may be relative to the cwd."""
    listing = []
    for path in paths:
        stat = path.stat()
        listing.append((Path(path).absolute().relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return listing


def _fingerprint(listing: list[tuple[str, int, int]], size: int) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{size}|pillow {_pillow_version()}\n".encode())
    for rel, nbytes, mtime in listing:
        digest.update(f"{rel}\t{nbytes}\t{mtime}\n".encode())
    return digest.hexdigest()[:24]


def _open(directory: Path, size: int) -> CacheEntry | None:
    try:
        store = PixelStore(directory / PIXELS, 0, size)  # open the pixels before the index (see module doc)
        index = json.loads((directory / INDEX).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if index.get("format") != CACHE_FORMAT or index.get("size") != size:
        return None
    store.count = len(index["files"])
    return CacheEntry(directory, [f[0] for f in index["files"]], index["skipped"], store, len(index["files"]), 0)


def _decode_one(path: Path, size: int) -> np.ndarray | str:
    try:
        return decode_image(path, size)
    except InvalidImageError as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable file ({exc.strerror or type(exc).__name__})"


def open_or_build(
    root: Path, paths: list[Path], size: int, cache_root: Path | None = None, progress: Progress | None = None,
) -> CacheEntry:
    """The cache entry for ``paths`` (files under ``root``) at ``size`` px: reused when nothing changed, otherwise
    built, decoding in parallel only the files the previous entry does not hold unchanged."""
    root = Path(root).absolute()
    listing = _listing(root, paths)
    key = hashlib.sha256(f"{root}|{size}".encode()).hexdigest()[:16]
    dataset_dir = Path(cache_root or default_cache_root()) / f"{root.name}-{size}px-{key}"
    target = dataset_dir / _fingerprint(listing, size)
    entry = _open(target, size)
    if entry is not None:
        logger.info("reusing the decoded-image cache %s", target)
        return entry

    previous = [_open(d, size) for d in sorted(dataset_dir.glob("*")) if d.is_dir() and not d.name.startswith(".")]
    previous = [p for p in previous if p is not None]
    dataset_dir.mkdir(parents=True, exist_ok=True)
    reused, decoded = _build(target, root, listing, paths, size, previous[-1] if previous else None, progress)
    for stale in previous:
        if stale.directory != target:
            shutil.rmtree(stale.directory, ignore_errors=True)  # open readers keep their file descriptors
    entry = _open(target, size)
    if entry is None:
        raise OSError(f"the decoded-image cache {target} could not be read back")
    entry.reused, entry.decoded = reused, decoded
    return entry


def _build(target: Path, root: Path, listing: list[tuple[str, int, int]], paths: list[Path], size: int,
           old: CacheEntry | None, progress: Progress | None) -> tuple[int, int]:
    """Write the entry in a staging directory beside ``target`` and rename it into place; (rows reused, decoded)."""
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        fd = os.open(staging / PIXELS, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, size * size * 3 * len(listing))
            skipped, todo = _copy_unchanged(fd, listing, size, old)
            skipped.update(_decode_into(fd, todo, listing, paths, size, progress))
        finally:
            os.close(fd)
        index = {"format": CACHE_FORMAT, "root": str(root), "size": size, "pillow": _pillow_version(),
                 "files": [list(item) for item in listing], "skipped": skipped}
        (staging / INDEX).write_text(json.dumps(index) + "\n")
        try:
            os.replace(staging, target)
        except OSError:  # another process built the same entry meanwhile: use theirs
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return len(listing) - len(todo), len(todo)


def _copy_unchanged(fd: int, listing: list[tuple[str, int, int]], size: int,
                    old: CacheEntry | None) -> tuple[dict[str, str], list[int]]:
    """Copy the rows ``old`` holds for unchanged files (same path, size, mtime) into ``fd``. Returns the reasons of
    the unchanged unreadable files, and the rows still to decode."""
    old_index = json.loads((old.directory / INDEX).read_text()) if old else None
    old_rows = {tuple(f): row for row, f in enumerate(old_index["files"])} if old_index else {}
    row_bytes = size * size * 3
    skipped: dict[str, str] = {}
    todo: list[int] = []
    for row, item in enumerate(listing):
        old_row = old_rows.get(item)
        if old_row is None:
            todo.append(row)
        elif item[0] in old.skipped:
            skipped[item[0]] = old.skipped[item[0]]
        else:
            os.pwrite(fd, old.store.read([old_row])[0].tobytes(), row * row_bytes)
    return skipped, todo


def _decode_into(fd: int, todo: list[int], listing: list[tuple[str, int, int]], paths: list[Path], size: int,
                 progress: Progress | None) -> dict[str, str]:
    """Decode the files of rows ``todo`` into ``fd``, in parallel. Returns why each unreadable one failed."""
    row_bytes = size * size * 3
    skipped: dict[str, str] = {}

    def work(row: int) -> str | None:
        result = _decode_one(paths[row], size)
        if isinstance(result, str):
            return result
        os.pwrite(fd, np.ascontiguousarray(result).tobytes(), row * row_bytes)
        return None

    # Pillow releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=available_cores()) as pool:
        for done, (row, reason) in enumerate(zip(todo, pool.map(work, todo)), start=1):
            if reason is not None:
                skipped[listing[row][0]] = reason
            if progress is not None:
                progress(done, len(todo))
    return skipped
