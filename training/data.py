"""Class-folder datasets: discovery, a stable seeded split, and decoding every image once into an on-disk cache.

Layouts accepted under ``--data DIR``:

- ``DIR/<class>/*.jpg``: one sub-folder per class; split train/val/test here.
- ``DIR/train/<class>/...`` with ``DIR/val/`` (or ``validation/``) and/or ``DIR/test/``: pre-split. A missing
  val or test split is carved out of ``train/`` the same way.

The split of a file is a function of its path and the seed only (:func:`split_position`): adding or removing other
images never moves it, so a later run never tests on what an earlier run trained on. Every class gets each split's
fraction in expectation (the hash is uniform); tiny classes vary.

Images are decoded with :func:`transferkit.core.images.decode_image`, the function the service uses, once per
dataset and size into the cache of :mod:`transferkit.training.cache`, and read back from disk batch by batch: memory
does not grow with the dataset. A file that fails to decode is skipped and listed (``strict=True`` makes it an
error instead).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.core.errors import DatasetError, UsageError
from transferkit.core.images import SUPPORTED_EXTENSIONS
from transferkit.training.cache import CacheEntry, PixelRows, open_or_build

SPLITS = ("train", "val", "test")
_SPLIT_DIR_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


@dataclass
class SplitData:
    """One split: file paths (relative to the dataset root), integer labels, decoded uint8 pixels."""

    files: list[str]
    labels: np.ndarray
    images: np.ndarray | PixelRows  # (N, H, W, 3) uint8: in memory, or rows of the on-disk cache

    def __len__(self) -> int:
        return len(self.labels)  # folds of k-fold cross-validation carry no file list


@dataclass
class Dataset:
    root: Path
    class_names: list[str]
    splits: dict[str, SplitData]
    presplit: bool
    image_size: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored_files: int = 0
    cache: dict = field(default_factory=dict)  # where the decoded images live, and how many were reused

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class per split."""
        return {
            name: {self.class_names[k]: v for k, v in sorted(Counter(split.labels.tolist()).items())}
            for name, split in self.splits.items()
        }

    def split_record(self, seed: int, fractions: dict[str, float]) -> dict:
        """The content of ``split.json``: every file's split, so the split is auditable and reproducible."""
        return {
            "root": str(self.root),
            "presplit": self.presplit,
            "method": SPLIT_METHOD,
            "seed": seed,
            "fractions": fractions,
            "class_names": self.class_names,
            "files": {
                path: {"split": name, "label": self.class_names[int(label)]}
                for name, split in self.splits.items()
                for path, label in zip(split.files, split.labels)
            },
            "skipped": self.skipped,
        }


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p))


def _image_files(folder: Path) -> tuple[list[Path], int]:
    """Image files under ``folder`` (recursive, sorted) and the number of other files ignored."""
    images, ignored = [], 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(_is_hidden(part) for part in path.relative_to(folder).parents if part.name):
            continue
        if _is_hidden(path):
            continue
        if path.suffix.lower() in SUPPORTED_EXTENSIONS:
            images.append(path)
        else:
            ignored += 1
    return images, ignored


def _detect_layout(root: Path) -> dict[str, Path] | None:
    """Pre-split layout -> {split: folder}; class-folder layout -> None."""
    subdirs = {p.name.lower(): p for p in _class_dirs(root)}
    if "train" not in subdirs or not set(subdirs) <= set(_SPLIT_DIR_NAMES):
        return None
    if "val" in subdirs and "validation" in subdirs:
        raise DatasetError(f"{root} has both val/ and validation/; keep one")
    return {_SPLIT_DIR_NAMES[name]: path for name, path in subdirs.items()}


def _collect(folder: Path, class_names: list[str] | None) -> tuple[dict[str, list[Path]], int]:
    """{class: files} for a class-folder directory; checks every class has images."""
    classes = _class_dirs(folder)
    found = {c.name: c for c in classes}
    if class_names is not None:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DatasetError(f"{folder} has classes not in train/: {', '.join(unknown)}")
    files: dict[str, list[Path]] = {}
    ignored = 0
    for name, path in found.items():
        images, skipped = _image_files(path)
        ignored += skipped
        if not images:
            raise DatasetError(
                f"class {name!r} in {folder} has no images (expected {', '.join(sorted(SUPPORTED_EXTENSIONS))})"
            )
        files[name] = images
    return files, ignored


SPLIT_METHOD = "sha256(seed:path) quantile"


def split_position(path: str, seed: int) -> float:
    """A number in [0, 1) that depends only on the file's dataset-relative path and the seed (uniform over paths)."""
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(path: str, seed: int, fractions: dict[str, float]) -> str:
    """``fractions`` in order (e.g. test, then val): the first whose cumulative share covers the file's position;
    "train" for the rest."""
    position, edge = split_position(path, seed), 0.0
    for name, fraction in fractions.items():
        edge += fraction
        if position < edge:
            return name
    return "train"


def check_data_dir(root: Path) -> Path:
    """Fail with one line unless ``root`` is an existing directory (cheap: runs before TensorFlow is imported)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"data directory not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"--data must be a directory of class folders, got a file: {root}")
    return root


def load_dataset(
    root: Path,
    image_size: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
    strict: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cache_dir: Path | None = None,
) -> Dataset:
    """Discover, split and decode a dataset (through the on-disk cache under ``cache_dir``, default
    :func:`~transferkit.core.system.default_cache_root`). Raises DatasetError with one readable line for
    unusable data."""
    root = check_data_dir(root)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UsageError(
            f"split fractions must be in [0, 1) and leave a training set, got val={val_fraction}, "
            f"test={test_fraction}"
        )
    layout, per_split_files, ignored = _discover(root)
    class_names = _class_names(root, per_split_files)
    class_index = {name: i for i, name in enumerate(class_names)}
    ordered: list[tuple[str, Path, int]] = [
        (split, path, class_index[name])
        for split, classes in per_split_files.items()
        for name, paths in sorted(classes.items())
        for path in paths
    ]
    entry = open_or_build(root, [path for _, path, _ in ordered], image_size, cache_dir, progress)
    # What to carve out of the pool: both splits for a flat layout, only the missing ones for a pre-split layout.
    carve = {name: frac for name, frac in (("test", test_fraction), ("val", val_fraction))
             if layout is None or name not in per_split_files}
    members, skipped = _assign_splits(entry, ordered, carve, seed, strict)
    _check_splits(members, carve, class_names)
    splits = {
        name: SplitData(files=files, labels=np.asarray(labels, dtype=np.int64),
                        images=PixelRows(entry.store, np.asarray(rows, dtype=np.int64)))
        for name, (files, labels, rows) in members.items()
    }
    return Dataset(
        root=root.absolute(),
        class_names=class_names,
        splits=splits,
        presplit=layout is not None,
        image_size=image_size,
        skipped=skipped,
        ignored_files=ignored,
        cache={"directory": str(entry.directory), "reused": entry.reused, "decoded": entry.decoded},
    )


def _discover(root: Path) -> tuple[dict[str, Path] | None, dict[str, dict[str, list[Path]]], int]:
    """(pre-split layout or None, {"all" or split: {class: files}}, number of non-image files ignored)."""
    layout = _detect_layout(root)
    per_split_files: dict[str, dict[str, list[Path]]] = {}
    if layout is None:
        per_split_files["all"], ignored = _collect(root, None)
        return layout, per_split_files, ignored
    per_split_files["train"], ignored = _collect(layout["train"], None)
    for name in ("val", "test"):
        if name in layout:
            per_split_files[name], more = _collect(layout[name], sorted(per_split_files["train"]))
            ignored += more
    return layout, per_split_files, ignored


def _class_names(root: Path, per_split_files: dict[str, dict[str, list[Path]]]) -> list[str]:
    first = per_split_files.get("all") or per_split_files["train"]
    class_names = sorted(first)
    if len(class_names) < 2:
        found = ", ".join(class_names) or "none"
        raise DatasetError(f"need at least 2 class folders in {root}, found {len(class_names)} ({found})")
    return class_names


Members = dict[str, tuple[list[str], list[int], list[int]]]  # split -> (files, labels, cache rows)


def _assign_splits(entry: CacheEntry, ordered: list[tuple[str, Path, int]], carve: dict[str, float], seed: int,
                   strict: bool) -> tuple[Members, list[dict[str, str]]]:
    """Each readable file's split (carved from the pool by its hash, or its pre-split folder), and the skipped."""
    skipped: list[dict[str, str]] = []
    total_carved = sum(carve.values())
    members: Members = {name: ([], [], []) for name in SPLITS}
    for row, (origin, _path, label) in enumerate(ordered):
        relative = entry.files[row]
        reason = entry.skipped.get(relative)
        if reason is not None:
            if strict:
                raise DatasetError(f"{relative}: {reason} (drop --strict to skip bad files)")
            skipped.append({"file": relative, "reason": reason})
            continue
        if origin in ("all", "train"):
            # Carved fractions are shares of the whole pool, as with a flat layout.
            name = assign_split(relative, seed, carve) if total_carved else "train"
        else:
            name = origin
        files, labels, rows = members[name]
        files.append(relative)
        labels.append(label)
        rows.append(row)
    return members, skipped


def _check_splits(members: Members, carve: dict[str, float], class_names: list[str]) -> None:
    """Every class keeps an image in the pool and no split is empty, after skipping unreadable files."""
    pool_labels = set(members["train"][1]) | set(members["val"][1] if "val" in carve else []) | set(
        members["test"][1] if "test" in carve else [])
    missing = sorted(set(range(len(class_names))) - pool_labels)
    if missing:
        names = ", ".join(class_names[m] for m in missing)
        raise DatasetError(f"class {names} has no readable images left after skipping corrupt files")
    for name in SPLITS:
        if not members[name][0]:
            raise DatasetError(
                f"the {name} split is empty ({sum(len(m[0]) for m in members.values())} readable images); "
                f"add images or raise the {name} fraction"
            )
