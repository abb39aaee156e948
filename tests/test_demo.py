"""``transferkit demo --quick``: the main job end to end, as a newcomer runs it."""

from __future__ import annotations

import json

from conftest import last_error_line, run_cli


def test_quick_demo_tells_the_whole_story(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in range(1, 8):
        assert f"=== [{step}/7]" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    # Task B has 40 labels per digit: the transferred backbone must beat the same network from scratch.
    assert summary["transfer_accuracy"] > summary["scratch_accuracy"] + 0.1, summary
    assert summary["http"]["sent"] == 10 and summary["http"]["corrupt_status"] == 400
    assert summary["http"]["correct"] >= 5
    assert summary["tag"].startswith("transferkit-demo:")
    for path in ("bundle/manifest.json", "bundle/model.onnx", "bundle/model.fp16.onnx", "bundle/saved_model",
                 "bench/results.md", "bench/latency.png", "bench/accuracy_vs_latency.png",
                 "runs/B_transfer/report.md", "transfer_vs_scratch.md"):
        assert (out / path).exists(), path
    assert "| onnx-fp16 |" in result.stdout and "HTTP 400" in result.stdout

    again = run_cli("demo", "--quick", "--out", str(out))
    assert again.returncode == 2 and "--force" in last_error_line(again)
