"""`transferkit predict --engine ray` on a real local Ray (2 CPUs): the same rows as the local engine.

One Ray is started per module (as the CLI starts one without --address) and the CLI joins it with --address, so
both ways in are exercised with a single start-up.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import last_error_line, run_cli

pytest.importorskip("ray", reason='the Ray extra is part of the test extra: pip install -e ".[test]"')


NOT_UTF8 = os.fsdecode(b"caf\xe9.png")  # Arrow strings must be UTF-8: the engine ships paths as bytes


def make_inputs(digits: Path, root: Path, per_class: int = 7) -> Path:
    """``root/<class>/*.png`` real images (one more in 7/, under a name that is not UTF-8), a corrupt PNG and a text
    file (skipped)."""
    for folder in sorted(p for p in digits.iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True)
        for source in sorted(folder.iterdir())[:per_class]:
            shutil.copy(source, root / folder.name / source.name)
    first = next(root.rglob("*.png"))
    shutil.copy(first, root / "7" / NOT_UTF8)
    (root / "0" / "corrupt.png").write_bytes(first.read_bytes()[:100])
    (root / "README.txt").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def ray_address():
    import ray

    from transferkit.core.ray_engine import start_ray

    assert start_ray(num_cpus=2, object_store_memory=150 * 1024**2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_ray_and_local_engines_agree(bundle, digits_three, tmp_path, ray_address):
    from transferkit.core.classifier import load_bundle
    from transferkit.core.inputs import expand_inputs

    folder = make_inputs(digits_three, tmp_path / "in")
    items = list(expand_inputs([folder]))
    classifier = load_bundle(bundle, "onnx", device="cpu")
    local = [o for batch in classifier.outcomes(items, "local", batch_size=8) for o in batch]
    remote = [o for batch in classifier.outcomes(items, "ray", batch_size=8) for o in batch]

    assert [o.path for o in remote] == [o.path for o in local] == [i.path for i in items]  # input order
    assert [o.error for o in remote] == [o.error for o in local]
    assert [o.skipped for o in remote] == [o.skipped for o in local]
    assert sum(o.skipped for o in local) == 1 and sum(o.error is not None for o in local) == 1
    classified = [(a, b) for a, b in zip(local, remote) if a.probabilities is not None]
    assert len(classified) == 3 * 7 + 1 and any(o.path.endswith(NOT_UTF8) for o in remote)
    for a, b in classified:
        assert a.probabilities.argmax() == b.probabilities.argmax()
        assert np.abs(a.probabilities - b.probabilities).max() <= 1e-6


def test_cli_joins_a_cluster_and_writes_the_same_rows(bundle, digits_three, tmp_path, ray_address):
    import pyarrow.parquet as pq

    folder = make_inputs(digits_three, tmp_path / "in", per_class=4)
    rows = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.parquet"
        extra = ["--engine", "ray", "--address", ray_address] if engine == "ray" else []
        result = run_cli("predict", str(bundle), str(folder), "--out", str(out), "--batch-size", "4", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "README.txt" in result.stdout and "corrupt.png" in result.stdout
        rows[engine] = pq.read_table(out).to_pylist()
    assert "ray (" + ray_address in result.stdout
    local, remote = rows["local"], rows["ray"]
    assert len(local) == 3 * 4 + 2 and any(r["path"].endswith("caf\\xe9.png") and r["label"] for r in remote)
    assert [(r["path"], r["label"], r["error"]) for r in remote] == [(r["path"], r["label"], r["error"])
                                                                      for r in local]
    for a, b in zip(local, remote):
        if a["error"] is None:
            assert [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]]
            assert abs(a["score"] - b["score"]) <= 1e-6


def test_missing_ray_is_a_one_line_error(bundle, tmp_path, monkeypatch):
    # A `ray` that cannot be imported, ahead of the real one on the path: what a plain `pip install` leaves.
    shadow = tmp_path / "shadow" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    result = run_cli("predict", str(bundle), str(tmp_path), "--engine", "ray", "--out", str(tmp_path / "r.csv"))
    assert result.returncode == 2
    assert 'pip install -e ".[ray]"' in last_error_line(result)
    assert "Traceback" not in result.stderr and not (tmp_path / "r.csv").exists()
