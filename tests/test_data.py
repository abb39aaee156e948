"""Dataset discovery, the stable seeded split, the decoded-image cache, skipping bad files, and the errors for
unusable data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from transferkit.core.errors import DatasetError, OutputExistsError, UsageError
from transferkit.core.images import decode_image
from transferkit.training.data import assign_split, load_dataset
from transferkit.training.digits import parse_classes, write_digits


def _assignment(dataset) -> dict[str, str]:
    return {f: name for name, split in dataset.splits.items() for f in split.files}


def test_digits_writer(tmp_path):
    counts = write_digits(tmp_path / "d", size=16, classes=[3, 4], per_class=5)
    assert counts == {"3": 5, "4": 5}
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".transferkit-output", "3", "4"]
    with pytest.raises(OutputExistsError):
        write_digits(tmp_path / "d", size=16)
    assert parse_classes("0-4") == [0, 1, 2, 3, 4]
    assert parse_classes("5,7,9") == [5, 7, 9]
    with pytest.raises(UsageError):
        parse_classes("3")


def test_full_digits_are_the_1797_sklearn_images(tmp_path):
    counts = write_digits(tmp_path / "all", size=8)
    assert sum(counts.values()) == 1797 and len(counts) == 10


def test_flat_layout_split_is_seeded_disjoint_and_roughly_stratified(digits_small):
    first = load_dataset(digits_small, 32, seed=7)
    again = load_dataset(digits_small, 32, seed=7)
    other = load_dataset(digits_small, 32, seed=8)
    for name in ("train", "val", "test"):
        assert first.splits[name].files == again.splits[name].files  # same seed, same split
    assert first.splits["test"].files != other.splits["test"].files
    all_files = [f for split in first.splits.values() for f in split.files]
    assert len(all_files) == len(set(all_files)) == 300
    # Each file's split is its own hash quantile: the shares are right in expectation. 300 files, 15%: the
    # binomial standard deviation is ~6 images, so 25..65 is more than 3 sigma on either side.
    for name in ("val", "test"):
        assert 25 <= len(first.splits[name]) <= 65, {n: len(s) for n, s in first.splits.items()}
        assert len(set(first.splits[name].labels.tolist())) >= 8  # most classes represented
    train = first.splits["train"]
    assert train.images.shape == (len(train), 32, 32, 3)
    # The pixels come from the on-disk cache and equal a direct decode with the guarded decoder.
    np.testing.assert_array_equal(train.images[0], decode_image(digits_small / train.files[0], 32))
    np.testing.assert_array_equal(train.images[[2, 0]][1], train.images[0])
    record = first.split_record(7, {"val": 0.15, "test": 0.15})
    assert record["files"][all_files[0]]["split"] in ("train", "val", "test")


def test_a_files_split_depends_only_on_its_path_and_the_seed(tmp_path, digits_small):
    """Adding images (a new class too) never moves an existing file to another split; nor does removing some."""
    root = tmp_path / "growing"
    shutil.copytree(digits_small, root)
    before = _assignment(load_dataset(root, 32, seed=3))
    extra = tmp_path / "extra"
    write_digits(extra, size=32, per_class=60)
    for cls in ("0", "1", "2"):
        for path in sorted((extra / cls).iterdir())[30:]:
            shutil.copy(path, root / cls / f"new_{path.name}")
    shutil.copytree(extra / "9", root / "nine_more")
    after = _assignment(load_dataset(root, 32, seed=3))
    assert len(after) == len(before) + 90 + 60
    assert {f: (before[f], after[f]) for f in before if before[f] != after[f]} == {}
    assert before == {f: assign_split(f, 3, {"test": 0.15, "val": 0.15}) for f in before}
    for path in sorted((root / "5").iterdir())[:10]:
        path.unlink()
    fewer = _assignment(load_dataset(root, 32, seed=3))
    assert len(fewer) == len(after) - 10 and all(after[f] == split for f, split in fewer.items())


def test_cache_is_reused_when_unchanged_and_rebuilt_when_files_change(tmp_path, digits_small):
    root = tmp_path / "cached"
    shutil.copytree(digits_small / "0", root / "0")
    shutil.copytree(digits_small / "1", root / "1")
    cache = tmp_path / "cache"
    first = load_dataset(root, 32, cache_dir=cache)
    assert first.cache["decoded"] == 60 and first.cache["reused"] == 0
    again = load_dataset(root, 32, cache_dir=cache)
    assert again.cache["decoded"] == 0 and again.cache["directory"] == first.cache["directory"]
    # A file changes (same name, new content): only it is decoded again, and its new pixels are served.
    target = root / "0" / sorted(os.listdir(root / "0"))[0]
    shutil.copy(sorted((digits_small / "7").iterdir())[0], target)
    os.utime(target, ns=(1, 1))
    changed = load_dataset(root, 32, cache_dir=cache)
    assert changed.cache["decoded"] == 1 and changed.cache["reused"] == 59
    assert changed.cache["directory"] != first.cache["directory"]
    assert not Path(first.cache["directory"]).exists()  # the stale entry is removed
    relative = target.relative_to(root).as_posix()
    split = next(s for s in changed.splits.values() if relative in s.files)
    np.testing.assert_array_equal(split.images[split.files.index(relative)], decode_image(target, 32))
    assert load_dataset(root, 40, cache_dir=cache).cache["decoded"] == 60  # another size, another entry


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
    assert len(data.splits["test"]) == 15 and len(data.splits["val"]) + len(data.splits["train"]) == 60
    assert all(f.startswith("train/") for f in data.splits["val"].files)
    assert all(assign_split(f, 42, {"val": 0.2}) == "val" for f in data.splits["val"].files)
    assert all(assign_split(f, 42, {"val": 0.2}) == "train" for f in data.splits["train"].files)


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
    with pytest.raises(DatasetError, match="split is empty"):
        load_dataset(tiny, 32)


def test_all_corrupt_class_is_an_error(tmp_path, digits_small):
    root = tmp_path / "bad"
    shutil.copytree(digits_small / "0", root / "0")
    (root / "1").mkdir()
    for i in range(3):
        (root / "1" / f"{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="class 1 has no readable images"):
        load_dataset(Path(root), 32)
