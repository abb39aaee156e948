"""The embedded dataset: scikit-learn's handwritten digits written as a class-folder PNG dataset.

The 1,797 8x8 digit images ship inside scikit-learn, so demos and tests have real images without a download.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from transferkit.core.atomic import atomic_output_dir
from transferkit.core.errors import UsageError


def parse_classes(spec: str | None) -> list[int]:
    """``"0-4"``, ``"5,6,7"`` or ``None`` (all ten digits) -> sorted digits."""
    if not spec:
        return list(range(10))
    digits: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                digits.update(range(lo, hi + 1))
            elif part:
                digits.add(int(part))
        except ValueError:
            raise UsageError(f"--classes expects digits like '0-4' or '5,6,7', got {spec!r}") from None
    if not digits or min(digits) < 0 or max(digits) > 9:
        raise UsageError(f"--classes must name digits 0-9, got {spec!r}")
    if len(digits) < 2:
        raise UsageError(f"--classes must name at least 2 digits, got {spec!r}")
    return sorted(digits)


def write_digits(
    out: Path, size: int = 32, classes: list[int] | None = None, force: bool = False, per_class: int | None = None
) -> dict[str, int]:
    """Write the digits as ``out/<digit>/<index>.png`` (RGB, ``size`` px); return the image count per class.

    ``per_class`` keeps only the first N images of each digit (small datasets for quick runs and tests).
    """
    from sklearn.datasets import load_digits

    if per_class is not None and per_class < 1:
        raise UsageError(f"--per-class must be at least 1, got {per_class}")
    if not 8 <= size <= 1024:
        raise UsageError(f"--size must be between 8 and 1024 px, got {size}")
    wanted = set(classes if classes is not None else range(10))
    digits = load_digits()
    counts: Counter[str] = Counter()
    with atomic_output_dir(Path(out), force=force) as staging:
        for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
            if int(target) not in wanted or (per_class is not None and counts[str(int(target))] >= per_class):
                continue
            # 0..16 ink levels -> white ink on black, as in the original scans' rendering
            gray = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)
            image = Image.fromarray(gray).resize((size, size), Image.Resampling.BICUBIC)
            folder = staging / str(int(target))
            folder.mkdir(exist_ok=True)
            image.convert("RGB").save(folder / f"{index:04d}.png")
            counts[str(int(target))] += 1
    return dict(sorted(counts.items()))
