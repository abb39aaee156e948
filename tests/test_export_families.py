"""One member of every backbone family exported to ONNX and ONNX-fp16 and validated against Keras (fp32 gates)."""

from __future__ import annotations

import numpy as np
import pytest

from transferkit.core.backbones import registry
from transferkit.core.images import decode_image


def _family_members() -> list:
    """The first (smallest) member of each registry family: a test per family, none left out."""
    chosen: dict = {}
    for row in registry().values():
        chosen.setdefault(row.family, row)
    return list(chosen.values())


@pytest.mark.parametrize("row", _family_members(), ids=lambda row: row.family)
def test_every_family_exports_within_the_fp32_gates(row, digits_small, tmp_path):
    from transferkit.export.bundle import ValidationImages, export_model
    from transferkit.training.config import HeadConfig
    from transferkit.training.model import build_classifier

    size = max(32, row.min_size)
    files = sorted(digits_small.rglob("*.png"))[::4]  # 75 images, every class
    images = np.stack([decode_image(f, size) for f in files])
    labels = np.array([int(f.parent.name) for f in files])
    model = build_classifier(row, 10, size, "none", HeadConfig(dropout=0.0))
    result = export_model(model, out=tmp_path / "b", backbone=row.name, image_size=size,
                          class_names=[str(d) for d in range(10)],
                          validation=ValidationImages(images, labels, "digits"), formats=["onnx", "onnx-fp16"],
                          register=False, allow_mismatch=True, log=lambda line: None)
    report = {f.format: f for f in result.manifest.validation.formats}
    assert report["onnx"].passed, report["onnx"].failures
    fp16 = report["onnx-fp16"]
    print(f"\n{row.name} fp16: agreement {fp16.top1_agreement:.4f}, max |Δp| {fp16.max_abs_diff:.2e}")
    assert np.isfinite(fp16.max_abs_diff)
