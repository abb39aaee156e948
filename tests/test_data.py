"""Dataset discovery, the stratified seeded split, skipping bad files, and the errors for unusable data."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from transferkit.core.errors import DatasetError, OutputExistsError, UsageError
from transferkit.training.data import load_dataset
from transferkit.training.digits import parse_classes, write_digits


def test_digits_writer(tmp_path):
    counts = write_digits(tmp_path / "d", size=16, classes=[3, 4], per_class=5)
    assert counts == {"3": 5, "4": 5}
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["3", "4"]
    with pytest.raises(OutputExistsError):
        write_digits(tmp_path / "d", size=16)
    assert parse_classes("0-4") == [0, 1, 2, 3, 4]
    assert parse_classes("5,7,9") == [5, 7, 9]
    with pytest.raises(UsageError):
        parse_classes("3")


def test_full_digits_are_the_1797_sklearn_images(tmp_path):
    counts = write_digits(tmp_path / "all", size=8)
    assert sum(counts.values()) == 1797 and len(counts) == 10


def test_flat_layout_split_is_stratified_seeded_and_disjoint(digits_small):
    first = load_dataset(digits_small, 32, seed=7)
    again = load_dataset(digits_small, 32, seed=7)
    other = load_dataset(digits_small, 32, seed=8)
    sizes = {name: len(split) for name, split in first.splits.items()}
    assert sizes == {"train": 210, "val": 45, "test": 45}
    for name in ("train", "val", "test"):
        assert first.splits[name].files == again.splits[name].files  # same seed, same split
        counts = Counter(first.splits[name].labels.tolist())
        assert max(counts.values()) - min(counts.values()) <= 1  # stratified
    assert first.splits["test"].files != other.splits["test"].files
    all_files = [f for split in first.splits.values() for f in split.files]
    assert len(all_files) == len(set(all_files)) == 300
    assert first.splits["train"].images.shape == (210, 32, 32, 3)
    record = first.split_record(7, {"val": 0.15, "test": 0.15})
    assert len(record["files"]) == 300 and record["files"][all_files[0]]["split"] in ("train", "val", "test")


def test_presplit_layout_with_validation_name_and_carved_val(tmp_path, digits_small):
    root = tmp_path / "presplit"
    for split, digits in (("train", range(0, 20)), ("validation", range(20, 25)), ("test", range(25, 30))):
        for cls in ("0", "1", "2"):
            (root / split / cls).mkdir(parents=True)
            for path in sorted((digits_small / cls).iterdir())[digits.start:digits.stop]:
                shutil.copy(path, root / split / cls / path.name)
    data = load_dataset(root, 32)
    assert data.presplit and data.class_names == ["0", "1", "2"]
    assert {n: len(s) for n, s in data.splits.items()} == {"train": 60, "val": 15, "test": 15}
    assert all(f.startswith("validation/") for f in data.splits["val"].files)

    shutil.rmtree(root / "validation")  # val missing: carved out of train/, test/ kept as given
    data = load_dataset(root, 32, val_fraction=0.2)
    assert len(data.splits["test"]) == 15 and len(data.splits["val"]) == 12
    assert all(f.startswith("train/") for f in data.splits["val"].files)


def test_corrupt_files_are_skipped_and_listed_or_fail_strict(tmp_path, digits_small):
    root = tmp_path / "dirty"
    shutil.copytree(digits_small, root)
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "4" / "notes.txt").write_text("ignored: not an image extension")
    (root / "5" / ".hidden.png").write_bytes(b"hidden files are ignored")
    data = load_dataset(root, 32)
    assert data.skipped == [{"file": "3/broken.png", "reason": data.skipped[0]["reason"]}]
    assert "corrupt image header" in data.skipped[0]["reason"]
    assert data.ignored_files == 1
    with pytest.raises(DatasetError, match="3/broken.png"):
        load_dataset(root, 32, strict=True)


def test_unusable_datasets_fail_with_one_clear_line(tmp_path, digits_small):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing", 32)
    one = tmp_path / "one"
    shutil.copytree(digits_small / "0", one / "0")
    with pytest.raises(DatasetError, match="at least 2 class folders.*found 1"):
        load_dataset(one, 32)
    empty = tmp_path / "empty"
    shutil.copytree(digits_small / "0", empty / "0")
    (empty / "1").mkdir()
    with pytest.raises(DatasetError, match="class '1'.*has no images"):
        load_dataset(empty, 32)
    tiny = tmp_path / "tiny"
    for cls in ("a", "b"):
        (tiny / cls).mkdir(parents=True)
        shutil.copy(next((digits_small / "0").iterdir()), tiny / cls / "x.png")
    with pytest.raises(DatasetError, match="stratified"):
        load_dataset(tiny, 32)


def test_all_corrupt_class_is_an_error(tmp_path, digits_small):
    root = tmp_path / "bad"
    shutil.copytree(digits_small / "0", root / "0")
    (root / "1").mkdir()
    for i in range(3):
        (root / "1" / f"{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="class 1 has no readable images"):
        load_dataset(Path(root), 32)
