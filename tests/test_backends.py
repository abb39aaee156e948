"""Backends beyond onnxruntime and the `auto` choice: OpenVINO f32/bf16/int8 on the bundle's ONNX files, their
validation rows, what the CPU allows, the measured choice and its cache, and the micro-batcher of the `microbatch`
layout.

The selection logic is tested on every CPU with the capabilities given explicitly; what needs OpenVINO or a CPU with
bf16 skips with the reason where it is missing.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest

from conftest import run_cli
from transferkit.core.errors import UsageError
from transferkit.core.images import decode_image
from transferkit.core.manifest import read_manifest
from transferkit.training.rundir import split_files

openvino_installed = pytest.mark.skipif(
    not __import__("transferkit.core.openvino", fromlist=["installed"]).installed(),
    reason="OpenVINO is not installed (transferkit[openvino])")


def _bf16_here() -> bool:
    from transferkit.core.openvino import cpu_capabilities

    return "BF16" in cpu_capabilities()


def _images(trained_run, count: int = 24) -> np.ndarray:
    files = split_files(trained_run.run_dir, "test")[:count]
    return np.stack([decode_image(path, 32) for path, _ in files])


def _with_validation(bundle, tmp_path, edit) -> object:
    """A copy of ``bundle`` whose manifest's validation rows went through ``edit(rows) -> rows``."""
    from transferkit.core.predictors import load_bundle

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["validation"]["formats"] = edit(raw["validation"]["formats"])
    (copy / "manifest.json").write_text(json.dumps(raw))
    return load_bundle(copy)


# --- what the CPU allows (pure logic: every CPU) ---------------------------------------------------------------


def test_a_precision_runs_only_where_the_cpu_computes_it_natively():
    from transferkit.core.openvino import unavailable_reason

    avx2 = frozenset({"FP32", "INT8", "BIN"})  # what OpenVINO reports on an AVX2-only EPYC
    amx = frozenset({"FP32", "BF16", "INT8", "FP16", "BIN"})
    assert "AMX or AVX-512 BF16" in unavailable_reason("bf16", avx2)
    assert unavailable_reason("bf16", amx) == ""
    assert unavailable_reason("fp32", avx2) == unavailable_reason("int8", avx2) == ""
    assert "INT8" in unavailable_reason("int8", frozenset({"FP32"}))


def test_auto_candidates_follow_the_bundle_its_gates_and_the_cpu(bundle, tmp_path):
    from transferkit.core.backends import candidate_backends

    amx = frozenset({"FP32", "BF16", "INT8"})
    avx2 = frozenset({"FP32", "INT8"})

    def rows(formats):  # the engine rows as an export on an AMX machine writes them
        onnx = next(row for row in formats if row["format"] == "onnx")
        extra = [{**onnx, "format": name} for name in ("openvino", "openvino-bf16")]
        return [row for row in formats if not row["format"].startswith("openvino")] + extra

    loaded = _with_validation(bundle, tmp_path, rows)
    chosen, skipped = candidate_backends(loaded, amx)
    assert chosen == ["onnx", "openvino", "openvino-bf16"]
    no_int8 = "the bundle has no onnx-int8 file"
    assert skipped == {"openvino-int8": no_int8, "onnx-int8": no_int8}
    chosen, skipped = candidate_backends(loaded, avx2)
    assert chosen == ["onnx", "openvino"] and "AMX or AVX-512 BF16" in skipped["openvino-bf16"]

    def failed_and_costly(formats):
        formats = rows(formats)
        for row in formats:
            if row["format"] == "openvino":
                row["passed"], row["failures"] = False, ["max |Δp| 1e-2 > 1e-04"]
            if row["format"] == "openvino-bf16":
                row["accuracy_change"] = -0.02  # two points of validation accuracy for speed: not automatically
        return formats

    chosen, skipped = candidate_backends(_with_validation(bundle, tmp_path / "b", failed_and_costly), amx)
    assert chosen == ["onnx"]
    assert skipped["openvino"] == "failed its validation gate"
    assert skipped["openvino-bf16"] == "accuracy cost 2.0 pt > 0.5 pt"


def test_auto_measures_once_and_the_next_process_reads_the_measurement(bundle, tmp_path, monkeypatch):
    from transferkit.core import backends
    from transferkit.core.predictors import load_bundle

    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_bundle(bundle)
    candidates, _ = backends.candidate_backends(loaded)
    if len(candidates) < 2:
        pytest.skip(f"one CPU candidate here ({candidates}): nothing to measure")
    choice = backends.choose_backend(loaded, "cpu", threads=1)
    assert set(choice.images_per_second) == set(candidates) and choice.backend in candidates
    fastest = max(candidates, key=lambda name: max(choice.images_per_second[name].values()))
    assert choice.backend == fastest and all(v > 0 for s in choice.images_per_second.values() for v in s.values())
    rates = choice.images_per_second[choice.backend]
    assert choice.batch_scaling == pytest.approx(rates["8"] / rates["1"], abs=0.01)
    assert len(list((tmp_path / "cache" / "backend-choice").glob("*.json"))) == 1

    def no_timing(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(backends, "measure", no_timing)
    assert backends.choose_backend(load_bundle(bundle), "cpu", threads=1) == choice
    with pytest.raises(AssertionError, match="measured again"):  # another thread count is another measurement
        backends.choose_backend(loaded, "cpu", threads=2)


def test_a_named_backend_is_kept_and_only_its_scaling_is_measured(bundle, tmp_path, monkeypatch):
    from transferkit.core.backends import choose_backend
    from transferkit.core.predictors import load_bundle

    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / "cache"))
    choice = choose_backend(load_bundle(bundle), "cpu", threads=1, backend="onnx")
    assert choice.backend == "onnx" and list(choice.images_per_second) == ["onnx"]
    assert choice.reason.startswith("named by the user") and choice.batch_scaling > 0


# --- OpenVINO on the real bundle ---------------------------------------------------------------------------------


@openvino_installed
def test_export_validates_the_engines_this_cpu_runs(bundle):
    rows = {row.format: row for row in read_manifest(bundle).validation.formats}
    assert rows["openvino"].passed and rows["openvino"].max_abs_diff <= 1e-4
    if _bf16_here():
        bf16 = rows["openvino-bf16"]
        assert bf16.passed and "max |Δp| ≤ 2e-01" in bf16.gate and bf16.decisive_agreement == 1.0
    else:
        assert "openvino-bf16" not in rows  # never validated where it would silently run f32
    assert "openvino-int8" not in rows  # the bundle has no int8 file


@openvino_installed
def test_openvino_answers_like_onnxruntime_and_never_starts_telemetry(bundle, trained_run):
    import sys

    from transferkit.core.predictors import load_bundle

    images = _images(trained_run)
    loaded = load_bundle(bundle)
    reference = loaded.predictor("onnx", device="cpu")(images)
    f32 = loaded.predictor("openvino", device="cpu", threads=1)
    assert f32.provider == "OpenVINO:CPU:f32"
    assert np.abs(f32(images) - reference).max() <= 1e-4
    assert np.abs(f32(images[:1]) - reference[:1]).max() <= 1e-4  # the batch axis stays dynamic
    if _bf16_here():
        bf16 = loaded.predictor("openvino-bf16", device="cpu", threads=1)
        assert bf16.provider == "OpenVINO:CPU:bf16"
        assert np.abs(bf16(images) - reference).max() <= 0.2  # its gate's bound
    # `import openvino` would send an event through openvino_telemetry: transferkit makes OpenVINO use its stub.
    from openvino.tools.ovc import telemetry_utils

    assert sys.modules["openvino_telemetry"] is None
    assert telemetry_utils.tm.__name__ == "openvino.tools.ovc.telemetry_stub"
    with pytest.raises(UsageError, match="runs on the CPU"):
        loaded.predictor("openvino", device="gpu")


@openvino_installed
def test_an_engine_the_export_did_not_prove_is_refused(bundle, tmp_path):
    unvalidated = _with_validation(bundle, tmp_path, lambda rows: [r for r in rows if r["format"] != "openvino"])
    with pytest.raises(UsageError, match="exported without validating openvino"):
        unvalidated.predictor("openvino", device="cpu")

    def failed(rows):
        for row in rows:
            if row["format"] == "openvino":
                row["passed"], row["failures"] = False, ["top-1 differs on 3 of 40 decisive images"]
        return rows

    with pytest.raises(UsageError, match="failed its validation gate at export .top-1 differs"):
        _with_validation(bundle, tmp_path / "f", failed).predictor("openvino", device="cpu")


def test_predict_says_which_backend_auto_chose_and_why(bundle, trained_run, tmp_path):
    files = split_files(trained_run.run_dir, "test")[:2]
    result = run_cli("predict", str(bundle), *[str(f) for f, _ in files], "--out", str(tmp_path / "rows.csv"))
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("backend "))
    chosen = line.split()[1].rstrip(":")
    assert chosen in ("onnx", "openvino", "openvino-bf16")
    assert "measured here" in line or "only validated CPU backend" in line or "no CPU backend" in line


# --- the micro-batcher -------------------------------------------------------------------------------------------


class _Model:
    """Doubles its input; the first call can be held open to let requests queue behind it."""

    def __init__(self):
        self.calls: list[int] = []
        self.hold = threading.Event()
        self.hold.set()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.hold.wait(5)
        self.calls.append(len(pixels))
        if (pixels < 0).any():
            raise ValueError("negative pixels")
        return pixels * 2.0


def test_requests_queued_while_the_model_runs_share_its_next_call():
    from transferkit.service.microbatch import MicroBatcher

    model = _Model()
    batcher = MicroBatcher(model, max_batch=8)
    model.hold.clear()
    first = batcher.submit(np.full((1, 1), 1.0))
    time.sleep(0.1)  # the model thread holds the first call open
    queued = [batcher.submit(np.full((size, 1), float(size))) for size in (3, 4, 2)]
    model.hold.set()
    assert first.result(5).tolist() == [[2.0]]
    results = [future.result(5) for future in queued]
    assert [r.tolist() for r in results] == [[[6.0]] * 3, [[8.0]] * 4, [[4.0]] * 2]  # each caller its own rows
    # 3 + 4 fill 7 of 8: the 2-image request would overflow and goes first in the next call.
    assert model.calls == [1, 7, 2]


def test_a_failing_call_fails_only_its_own_requests():
    from transferkit.service.microbatch import MicroBatcher

    model = _Model()
    batcher = MicroBatcher(model, max_batch=4)
    with pytest.raises(ValueError, match="negative pixels"):
        batcher.submit(np.full((1, 1), -1.0)).result(5)
    assert batcher.submit(np.full((2, 1), 1.0)).result(5).tolist() == [[2.0], [2.0]]  # the thread goes on
    assert batcher.submit(np.zeros((6, 1))).result(5).shape == (6, 1)  # larger than a batch: runs alone
