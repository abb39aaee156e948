"""Class-folder datasets: discovery, a stratified seeded split, and decoding every image once.

Layouts accepted under ``--data DIR``:

- ``DIR/<class>/*.jpg``: one sub-folder per class; split train/val/test here (stratified, seeded).
- ``DIR/train/<class>/...`` with ``DIR/val/`` (or ``validation/``) and/or ``DIR/test/``: pre-split. A missing
  val or test split is carved out of ``train/`` with the same stratified, seeded split.

Images are decoded with :func:`transferkit.core.images.decode_image`, the function the service uses, exactly once
per run; the uint8 arrays are kept in memory (a quarter of the float32 size) and reused by every epoch and fold.
A file that fails to decode is skipped and listed (``strict=True`` makes it an error instead).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.core.errors import DatasetError, InvalidImageError, UsageError
from transferkit.core.images import SUPPORTED_EXTENSIONS, decode_image
from transferkit.core.system import available_cores

SPLITS = ("train", "val", "test")
_SPLIT_DIR_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


@dataclass
class SplitData:
    """One split: file paths (relative to the dataset root), integer labels, decoded uint8 pixels."""

    files: list[str]
    labels: np.ndarray
    images: np.ndarray  # (N, H, W, 3) uint8

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


def _stratified_split(
    items: list[str], labels: list[int], fraction: float, seed: int, what: str
) -> tuple[list[int], list[int]]:
    """Indices (kept, split off) with ``fraction`` of each class split off."""
    from sklearn.model_selection import train_test_split

    indices = list(range(len(items)))
    if fraction <= 0:
        return indices, []
    try:
        kept, taken = train_test_split(
            indices, test_size=fraction, stratify=labels, random_state=seed, shuffle=True
        )
    except ValueError as exc:
        counts = Counter(labels)
        smallest = min(counts.values())
        raise DatasetError(
            f"cannot split off a stratified {what} set of {fraction:.0%}: {exc} "
            f"(the smallest class has {smallest} images; add images or change the split fractions)"
        ) from None
    return sorted(kept), sorted(taken)


def _decode_all(
    paths: list[Path], size: int, progress: Callable[[int, int], None] | None
) -> list[np.ndarray | InvalidImageError]:
    def decode(path: Path) -> np.ndarray | InvalidImageError:
        try:
            return decode_image(path, size)
        except InvalidImageError as exc:
            return exc
        except OSError as exc:
            return InvalidImageError(f"unreadable file ({exc.strerror or type(exc).__name__})")

    results: list[np.ndarray | InvalidImageError] = []
    # Pillow releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=available_cores()) as pool:
        for done, result in enumerate(pool.map(decode, paths), start=1):
            results.append(result)
            if progress is not None:
                progress(done, len(paths))
    return results


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
) -> Dataset:
    """Discover, decode and split a dataset. Raises DatasetError with one readable line for unusable data."""
    root = check_data_dir(root)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UsageError(
            f"split fractions must be in [0, 1) and leave a training set, got val={val_fraction}, "
            f"test={test_fraction}"
        )

    layout = _detect_layout(root)
    per_split_files: dict[str, dict[str, list[Path]]] = {}
    ignored = 0
    if layout is None:
        per_split_files["all"], ignored = _collect(root, None)
    else:
        per_split_files["train"], ignored = _collect(layout["train"], None)
        for name in ("val", "test"):
            if name in layout:
                per_split_files[name], more = _collect(layout[name], sorted(per_split_files["train"]))
                ignored += more
    first = per_split_files.get("all") or per_split_files["train"]
    class_names = sorted(first)
    if len(class_names) < 2:
        found = ", ".join(class_names) or "none"
        raise DatasetError(f"need at least 2 class folders in {root}, found {len(class_names)} ({found})")
    class_index = {name: i for i, name in enumerate(class_names)}

    ordered: list[tuple[str, Path, int]] = [
        (split, path, class_index[name])
        for split, classes in per_split_files.items()
        for name, paths in sorted(classes.items())
        for path in paths
    ]
    decoded = _decode_all([path for _, path, _ in ordered], image_size, progress)

    skipped: list[dict[str, str]] = []
    good: dict[str, tuple[list[str], list[int], list[np.ndarray]]] = {}
    for (split, path, label), result in zip(ordered, decoded):
        relative = path.relative_to(root).as_posix()
        if isinstance(result, InvalidImageError):
            if strict:
                raise DatasetError(f"{relative}: {result} (drop --strict to skip bad files)")
            skipped.append({"file": relative, "reason": str(result)})
            continue
        files, labels, images = good.setdefault(split, ([], [], []))
        files.append(relative)
        labels.append(label)
        images.append(result)

    for split, (_, labels, _) in good.items():
        missing = sorted(set(range(len(class_names))) - set(labels))
        if split in ("all", "train") and missing:
            names = ", ".join(class_names[m] for m in missing)
            raise DatasetError(f"class {names} has no readable images left after skipping corrupt files")
    if not good:
        raise DatasetError(f"no readable images in {root}")

    splits: dict[str, SplitData] = {}

    def make(files: list[str], labels: list[int], images: list[np.ndarray], index: list[int]) -> SplitData:
        return SplitData(
            files=[files[i] for i in index],
            labels=np.asarray([labels[i] for i in index], dtype=np.int64),
            images=np.stack([images[i] for i in index]) if index else
            np.zeros((0, image_size, image_size, 3), np.uint8),
        )

    pool_name = "all" if layout is None else "train"
    files, labels, images = good[pool_name]
    remaining = list(range(len(files)))
    # What to carve out of the pool: both splits for a flat layout, only the missing ones for a pre-split layout.
    carve = {name: frac for name, frac in (("test", test_fraction), ("val", val_fraction))
             if layout is None or name not in good}
    pool_fraction = 1.0
    for name, frac in carve.items():
        sub_files = [files[i] for i in remaining]
        sub_labels = [labels[i] for i in remaining]
        kept, taken = _stratified_split(sub_files, sub_labels, frac / pool_fraction, seed, name)
        splits[name] = make(files, labels, images, [remaining[i] for i in taken])
        remaining = [remaining[i] for i in kept]
        pool_fraction -= frac
    splits["train"] = make(files, labels, images, remaining)
    for name in ("val", "test"):
        if name not in splits and name in good:
            f, lab, im = good[name]
            splits[name] = make(f, lab, im, list(range(len(f))))
    for name in SPLITS:
        if name not in splits or len(splits[name]) == 0:
            raise DatasetError(
                f"the {name} split is empty; add images or raise the {name} fraction"
            )
    return Dataset(
        root=root.absolute(),
        class_names=class_names,
        splits={name: splits[name] for name in SPLITS},
        presplit=layout is not None,
        image_size=image_size,
        skipped=skipped,
        ignored_files=ignored,
    )
