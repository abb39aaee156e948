"""The registry against Keras itself: every row builds, preprocessing matches, published counts match exactly."""

from __future__ import annotations

import csv
import gc
from pathlib import Path

import numpy as np
import pytest

from conftest import include_top_parameters
from transferkit.core.backbones import get_backbone, parse_backbones, published_table, registry
from transferkit.core.errors import UsageError

ROWS = list(registry().values())
# The keras.io table as published, shipped with the tests so that every clone checks the registry against it.
PUBLISHED_TABLE = Path(__file__).resolve().parent / "data" / "keras_applications_published.tsv"


def test_registry_covers_the_published_table_and_mobilenet_v3():
    table = published_table()
    assert len(table) == 38
    assert set(table) | {"MobileNetV3Small", "MobileNetV3Large"} == set(registry())
    assert len(registry()) == 40


def test_shipped_table_matches_the_published_reference():
    lines = [line for line in PUBLISHED_TABLE.read_text().splitlines() if line and not line.startswith("#")]
    reference = {row["model"]: row for row in csv.DictReader(lines, delimiter="\t")}
    assert set(reference) == set(published_table())
    def number(text: str) -> float | None:
        return None if text.strip() in ("", "-") else float(text.rstrip("M"))

    for name, published in published_table().items():
        row = reference[name]
        assert (published.size_mb, published.top1, published.top5, published.depth, published.cpu_ms_per_step,
                published.gpu_ms_per_step) == tuple(number(row[k]) for k in (
                    "size_mb", "top1", "top5", "depth", "cpu_ms_per_step", "gpu_ms_per_step")), name
        if row["parameters"].strip().isdigit():
            assert published.parameters == int(row["parameters"]), name
        else:
            assert published.parameters is None and published.parameters_approx == number(row["parameters"]), name


def test_lookup_is_case_insensitive_and_errors_list_choices():
    assert get_backbone("mobilenetv2").name == "MobileNetV2"
    with pytest.raises(UsageError, match="unknown backbone 'ResNet9000'.*MobileNetV2"):
        get_backbone("ResNet9000")
    assert [b.name for b in parse_backbones("ResNet50, EfficientNetB0")] == ["ResNet50", "EfficientNetB0"]
    assert len(parse_backbones("all")) == 40


def test_input_size_and_weight_constraints():
    with pytest.raises(UsageError, match="at least 75 px"):
        get_backbone("InceptionV3").check_input_size(64)
    with pytest.raises(UsageError, match="only for input size 224"):
        get_backbone("NASNetMobile").check_input_size(96, "imagenet")
    assert get_backbone("NASNetMobile").check_input_size(96, "none") == []
    assert get_backbone("MobileNetV2").check_input_size(96, "imagenet") == []
    assert "loads the 224 px weights" in get_backbone("MobileNetV2").check_input_size(64, "imagenet")[0]
    with pytest.raises(UsageError, match="alpha"):
        get_backbone("MobileNetV2").check_alpha(0.6, "imagenet")
    with pytest.raises(UsageError, match="MobileNet backbones only"):
        get_backbone("ResNet50").check_alpha(0.5)


def _free():
    import keras

    keras.backend.clear_session()
    gc.collect()


# Each family's first row is built headless at this size, and its outputs checked finite, by its export in
# test_export_families.py (which checks its parameter count too): built here as well, it would only add minutes.
FAMILY_FIRSTS = {next(r for r in ROWS if r.family == family).name for family in {row.family for row in ROWS}}
OTHER_ROWS = [row for row in ROWS if row.name not in FAMILY_FIRSTS]
EXACT = [row for row in ROWS if row.published and row.published.parameters]


@pytest.mark.parametrize("row", OTHER_ROWS, ids=[row.name for row in OTHER_ROWS])
def test_every_backbone_builds_headless_and_gives_finite_features(row):
    size = max(row.min_size, 32)
    base = row.constructor()(include_top=False, weights=None, input_shape=(size, size, 3))
    features = np.asarray(base(np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32"),
                               training=False))
    assert features.ndim == 4 and features.shape[0] == 1
    assert np.isfinite(features).all()
    if row in EXACT:
        assert base.count_params() + include_top_parameters(row, features.shape[-1]) == row.published.parameters
    del base
    _free()


class _SizeSeen(Exception):
    pass


@pytest.mark.parametrize("row", EXACT, ids=[row.name for row in EXACT])
def test_default_size_is_the_one_keras_builds_at(row, monkeypatch):
    """The registry's default size is the input keras.applications builds ``include_top=True`` at (where the
    ImageNet weights fit): read from the size Keras asks for, stopped before anything is built."""
    from keras.src.applications import imagenet_utils

    def seen(*args, **kwargs):
        raise _SizeSeen(kwargs["default_size"])

    monkeypatch.setattr(imagenet_utils, "obtain_input_shape", seen)
    with pytest.raises(_SizeSeen) as asked:
        row.constructor()(include_top=True, weights=None)
    assert asked.value.args[0] == row.default_size


def test_exact_counts_cover_every_row_the_table_gives_exactly():
    assert len(EXACT) == 18  # Xception .. NASNetLarge; the table prints EfficientNet/ConvNeXt counts rounded
