"""Shared fixtures: generated datasets, isolated Keras/BentoML homes, a CLI runner.

Tests run real components: real image files, real Keras training, the real CLI in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

@pytest.fixture(autouse=True, scope="session")
def isolated_homes(tmp_path_factory):
    """No test reads or writes the user's ~/.keras or BentoML store (and no ImageNet weights are cached)."""
    home = tmp_path_factory.mktemp("homes")
    os.environ["KERAS_HOME"] = str(home / "keras")
    os.environ["BENTOML_HOME"] = str(home / "bentoml")
    yield


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``transferkit ARGS`` in a subprocess, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, timeout=timeout,
        cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def last_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("transferkit ")]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def digits_small(tmp_path_factory) -> Path:
    """All ten digits, 30 per class, 32 px: 300 real images."""
    from training.digits import write_digits

    out = tmp_path_factory.mktemp("data") / "digits_small"
    write_digits(out, size=32, per_class=30)
    return out


@pytest.fixture(scope="session")
def digits_three(tmp_path_factory) -> Path:
    """Digits 0, 1 and 7 (every image: ~540), 32 px: enough to show that training learns."""
    from training.digits import write_digits

    out = tmp_path_factory.mktemp("data") / "digits_three"
    write_digits(out, size=32, classes=[0, 1, 7])
    return out
