"""Timing and environment helpers shared by the sweep and the load test.

Method (shared/reference/performance.md): warm every backend and batch shape first, then time ``repeats`` steps and
report the median with p90 and the min-max spread; compare backends side by side in one process.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import numpy as np


def time_steps(step: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    """Median/p90/min/max milliseconds of ``step`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1000)
    return {
        "median_ms": statistics.median(samples),
        "p90_ms": float(np.percentile(samples, 90)),
        "min_ms": min(samples),
        "max_ms": max(samples),
    }


def gpu_model() -> str | None:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(settings: dict) -> dict:
    from transferkit.core.system import available_cores, cpu_model

    versions = {}
    for name in ("tensorflow", "keras", "onnxruntime-gpu", "onnx", "tf2onnx", "bentoml", "numpy", "locust",
                 "pillow"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return {
        "cpu": cpu_model(), "cores_available": available_cores(), "cores_total": os.cpu_count(),
        "gpu": gpu_model(), "python": platform.python_version(), "platform": platform.platform(),
        "versions": versions, "settings": settings,
    }
