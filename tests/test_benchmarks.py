"""``transferkit bench`` (sweep and bundle modes) and ``transferkit loadtest`` run for real, small."""

from __future__ import annotations

import csv
import json
import re
from datetime import datetime

import pytest

from conftest import last_error_line, run_cli
from transferkit.core.manifest import RUNTIME_BACKENDS


def test_tiny_sweep_writes_every_output_and_keeps_going_past_a_failure(tmp_path):
    out = tmp_path / "bench"
    result = run_cli("bench", "--backbones", "MobileNetV3Small,Xception", "--image-size", "32", "--batch-sizes",
                     "1,4", "--backends", "keras,onnx,onnx-fp16", "--repeats", "3", "--warmup", "1",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| MobileNetV3Small | onnx |" in result.stdout
    # A line of the progress bar as each backbone starts (stdout is no terminal here: lines, no redrawing).
    assert re.search(r"^MobileNetV3Small: +0%\|.*\n(.*\n)*Xception: +50%\|", result.stdout, re.M), result.stdout
    assert re.search(r"^done: 100%\|#+\| 2/2 backbones \[", result.stdout, re.M) and "\r" not in result.stdout
    for name in ("results.md", "results.csv", "results.json", "latency.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    env = data["environment"]
    assert env["cores_available"] >= 1 and "onnxruntime-gpu" in env["versions"] and env["cpu"]
    rows = {(r["model"], r["backend"]): r for r in data["rows"]}
    # Xception needs 71 px: its rows carry the error, the sweep went on.
    assert all(rows[("Xception", b)]["error"] and "71" in rows[("Xception", b)]["error"]
               for b in ("keras", "onnx", "onnx-fp16"))
    keras, onnx, fp16 = (rows[("MobileNetV3Small", b)] for b in ("keras", "onnx", "onnx-fp16"))
    for row in (keras, onnx, fp16):
        assert row["error"] is None
        assert set(row["latency"]) == {"1", "4"}
        for batch, timing in row["latency"].items():  # throughput is the batch over the median step, not the mean
            assert row["images_per_s"][batch] == pytest.approx(int(batch) / (timing["median_ms"] / 1000), rel=1e-6)
        assert row["parameters"] == keras["parameters"] > 0 and row["depth"] > 100
    for batch in ("1", "4"):  # the speed-up is the ratio of the two rows' measured throughputs, batch by batch
        expected = onnx["images_per_s"][batch] / keras["images_per_s"][batch]
        assert onnx["speedup_vs_keras"][batch] == pytest.approx(expected, rel=1e-6)
        assert fp16["speedup_vs_keras"][batch] == pytest.approx(
            fp16["images_per_s"][batch] / keras["images_per_s"][batch], rel=1e-6)
    assert keras["predict_b1_ms"] > 0 and keras["provider"] == "TF:CPU"
    assert onnx["provider"] == "CPUExecutionProvider"
    assert 0.4 < fp16["size_mb"] / onnx["size_mb"] < 0.6
    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 6 and float(table[0]["b4_images_per_s"]) > 0


def test_bundle_mode_measures_accuracy(bundle, digits_three, trained_run, tmp_path):
    out = tmp_path / "bench"
    result = run_cli("bench", "--bundles", str(bundle), "--data", str(digits_three), "--batch-sizes", "1,8",
                     "--backends", "keras,onnx,onnx-fp16,onnx-int8", "--repeats", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^done: 100%\|#+\| 1/1 bundles \[", result.stdout, re.M), result.stdout
    rows = {r["backend"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    expected = trained_run.metrics["test"]["accuracy"]
    for backend in ("keras", "onnx", "onnx-fp16"):
        assert rows[backend]["error"] is None
        assert abs(rows[backend]["accuracy"] - expected) < 0.15  # all images, not only the test split
    assert rows["onnx"]["accuracy"] == rows["keras"]["accuracy"]
    assert "not in this bundle" in rows["onnx-int8"]["error"]
    assert (out / "accuracy_vs_latency.png").stat().st_size > 0


def test_bench_errors_are_one_line(tmp_path):
    for args, expected in [
        (["bench", "--out", str(tmp_path)], "--backbones"),
        (["bench", "--backbones", "NoSuchNet", "--out", str(tmp_path)], "NoSuchNet"),
        (["bench", "--backbones", "MobileNetV2", "--backends", "tflite", "--out", str(tmp_path)], "tflite"),
        (["bench", "--bundles", str(tmp_path), "--out", str(tmp_path)], "--data"),
        (["loadtest", "--out", str(tmp_path)], "exactly one of --url"),
        (["loadtest", "--url", "http://127.0.0.1:9", "--rounds", "2", "--out", str(tmp_path)], "--rounds"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in last_error_line(result), (args, result.stderr)


def test_loadtest_compares_the_service_with_the_baseline_and_the_in_process_pipeline(bundle, tmp_path):
    """Two rounds: the baseline goes first in the second, and each run keeps its own files."""
    out = tmp_path / "load"
    result = run_cli("loadtest", "--model", str(bundle), "--compare-baseline", "--rounds", "2", "--users", "6",
                     "--spawn-rate", "6", "--duration", "4s", "--pipeline-seconds", "2", "--max-p95-ms", "0.001",
                     "--out", str(out), timeout=500)
    assert result.returncode == 1, result.stderr[-3000:]  # the impossible p95 threshold
    assert "thresholds exceeded: p95" in last_error_line(result)
    summaries = json.loads((out / "summary.json").read_text())
    assert [(s["round"], s["server"]) for s in summaries] == [
        (1, "transferkit"), (1, "baseline"), (2, "transferkit"), (2, "baseline")]
    runs = [line for line in result.stdout.splitlines() if line.startswith("running locust against ")]
    assert [line.split(": ")[0].removeprefix("running locust against ") for line in runs] == [
        "transferkit (round 1 of 2)", "baseline (round 1 of 2)",
        "baseline (round 2 of 2)", "transferkit (round 2 of 2)"]
    starts = [line.split(" for ")[0] for line in result.stdout.splitlines() if line.startswith("starting ")]
    assert starts == ["starting transferkit", "starting baseline"]  # once each: both stay up for every round
    for summary in summaries:
        assert summary["requests"] > 10 and summary["failures"] == 0 and summary["failure_ratio"] == 0
        assert summary["images_per_s"] > 0 and summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
        assert summary["by_name"]["bad input (expects 4xx)"]["failures"] == 0
        assert summary["pipeline_images_per_s"] > 0
        assert summary["served_over_pipeline"] == summary["images_per_s"] / summary["pipeline_images_per_s"]
    # The service ran the backend `auto` chose; the tiny test model batches well (4.8x measured), so it runs the
    # microbatch layout, whose batches /metrics counts for the whole service.
    for service in summaries[0::2]:
        assert service["backend"] in RUNTIME_BACKENDS
        if service["layout"] == "microbatch":
            assert service["batch_calls"] > 0 and service["batch_size_mean"] >= 1
        else:
            assert service["layout"] == "inprocess" and service["batch_calls"] == 0  # no batching queue
    for name in ("comparison.md", "transferkit/round-1/locust_stats.csv", "transferkit/service.log",
                 "baseline/service.log", "baseline/round-2/locust.html"):
        assert (out / name).is_file(), name
    outputs = sorted(out.glob("*/round-*/locust_output.txt"))
    assert len(outputs) == 4
    for output in outputs:  # each run lasted its whole --duration, not less by the locustfile's import time
        stamps = [datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f") for line in output.read_text().splitlines()
                  if "Run time limit set" in line or "--run-time limit reached" in line]
        assert len(stamps) == 2 and (stamps[1] - stamps[0]).total_seconds() >= 3.5, output
    ratios = [s["images_per_s"] / b["images_per_s"] for s, b in (summaries[0:2], summaries[2:4])]
    comparison = (out / "comparison.md").read_text()
    assert f"per round: {ratios[0]:.2f}, {ratios[1]:.2f}" in comparison
    assert "served ÷ pipeline" in result.stdout and "baseline images/s" in result.stdout
    assert "over 2 rounds" in result.stdout


def test_lower_precisions_are_shown_against_the_same_models_fp32_onnx():
    from transferkit.benchmarks.report import markdown, versus_fp32
    from transferkit.benchmarks.sweep import Row

    rows = [Row("r50", "onnx", 64, images_per_s={1: 100.0, 32: 300.0}, accuracy=0.96),
            Row("r50", "onnx-int8", 64, images_per_s={1: 290.0, 32: 900.0}, accuracy=0.955),
            Row("mnv2", "onnx-int8", 64, images_per_s={1: 50.0}, accuracy=0.9),  # no fp32 row for this model
            Row("r50", "openvino-int8", 64, error="crashed")]
    compared = versus_fp32(rows, [1, 32])
    assert compared[id(rows[1])]["speed"] == {1: 2.9, 32: 3.0}
    assert compared[id(rows[1])]["top1_points"] == pytest.approx(-0.5)
    assert compared[id(rows[0])] == compared[id(rows[2])] == {"speed": {}, "top1_points": None}
    assert compared[id(rows[3])] == {"speed": {}, "top1_points": None}
    table = markdown(rows, [1, 32])
    assert "| × fp32 b32 |" in table.splitlines()[0] and "| 2.90 |" in table and "| -0.50 |" in table
