"""Shared fixtures: generated datasets, isolated Keras/BentoML homes, a CLI runner.

Tests run real components: real image files, real Keras training, the real CLI in a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
# Exports (tf2onnx, fp16, int8) copy the model's graph many times over: exporting ResNet50 at 32 px touched ~12 GB of
# fresh pages (3.2 million page faults), a third of the process's CPU time spent by the kernel zeroing them. Transparent
# huge pages for malloc's memory cut the faults 20x and an export's time by ~12 % (Xception + ResNet50V2 + DenseNet121:
# 103 -> 91 s, AMD EPYC, 2026-12-07); training was unchanged. Every process the tests start (xdist workers included:
# the controller loads this file first) inherits it; glibc before 2.35 ignores it.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
# Each xdist worker, and each CLI it starts, runs TensorFlow with pools sized to the whole machine by default: two
# workers oversubscribe the cores. Two trainings side by side finished 7-15 % sooner with a worker's share of the
# cores each (52 / 61 s against 56 / 71 s, two rounds, AMD EPYC, 2 cores, 2026-12-07). Set in the worker (xdist sets
# the count before it loads this file), so that a run without xdist keeps TensorFlow's default.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    from transferkit.core.system import available_cores

    _share = str(max(1, available_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", _share)
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", _share)

# Scheduling over the xdist workers (--dist loadgroup): every file is one unit of work on one worker, where its
# module fixtures (servers, trained runs) are built once, except the files below, whose tests are independent builds
# of one backbone each: they are spread test by test, so that no worker is left with a 9-minute file at the end.
SPREAD_FILES = {"test_export_families.py", "test_backbones.py"}
# Seconds per file on the 2-core CI machine (AMD EPYC, 2026-12-06): units start longest first, so that the last ones
# to finish are short. Only the order matters; an unlisted file counts as short.
FILE_SECONDS = {"test_demo.py": 155, "test_service.py": 125, "test_packaging.py": 100, "test_training_resume.py": 120,
                "test_training.py": 90, "test_explain.py": 90, "test_benchmarks.py": 65, "test_export.py": 55,
                "test_shutdown.py": 45, "test_hostile_http.py": 40, "test_predict.py": 30, "test_layouts.py": 27,
                "test_calibration.py": 26, "test_cli.py": 25, "test_ray.py": 19, "test_export_foreign.py": 10,
                "test_training_model.py": 10, "test_stopping.py": 10, "test_images.py": 10}


def _estimated_seconds(item: pytest.Item) -> float:
    if item.path.name == "test_export_families.py" and hasattr(item, "callspec"):  # a batch of families: 40 to 80 s
        return 60.0
    return FILE_SECONDS.get(item.path.name, 5.0 if item.path.name in SPREAD_FILES else 1.0)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name not in SPREAD_FILES:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    # The file that builds the shared trained run goes first, so that no worker waits on its lock for long.
    items.sort(key=lambda item: (item.path.name != "test_service.py", -_estimated_seconds(item)))


@pytest.fixture(autouse=True, scope="session")
def isolated_homes(tmp_path_factory):
    """No test reads or writes the user's ~/.keras or BentoML store (and no ImageNet weights are cached)."""
    home = tmp_path_factory.mktemp("homes")
    os.environ["KERAS_HOME"] = str(home / "keras")
    os.environ["BENTOML_HOME"] = str(home / "bentoml")
    os.environ["TRANSFERKIT_CACHE_DIR"] = str(home / "image-cache")  # training's decoded-image cache
    yield


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``transferkit ARGS`` in a subprocess, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, timeout=timeout,
        cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def run_cli_here(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``transferkit ARGS`` in this process (parse, then :func:`transferkit.cli.run`), output captured: for the
    commands that stop with a one-line error before any work, where a subprocess would only add its start-up.
    A command that does real work, handles signals or needs the log router goes through :func:`run_cli`."""
    from transferkit.cli import build_parser, run

    stdout, stderr = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = run(build_parser().parse_args(list(args)))
            except SystemExit as exc:  # argparse's usage errors and --help
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["transferkit", *args], code, stdout.getvalue(), stderr.getvalue())


def last_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("transferkit ")]
    return lines[-1] if lines else ""


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(path)`` once for the whole run, whichever xdist worker asks first; the others wait on a file lock
    under the run's shared base directory and reuse the result (a marker file says it is complete)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # popen-gwN's parent: one directory for every worker of this run
    path = base / "shared" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        done = path.with_name(name + ".done")
        if not done.exists():
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def digits_small(tmp_path_factory) -> Path:
    """All ten digits, 30 per class, 32 px: 300 real images."""
    from transferkit.training.digits import write_digits

    out = tmp_path_factory.mktemp("data") / "digits_small"
    write_digits(out, size=32, per_class=30)
    return out


@pytest.fixture(scope="session")
def digits_three(tmp_path_factory) -> Path:
    """Digits 0, 1 and 7 (every image: ~540), 32 px: enough to show that training learns."""
    from transferkit.training.digits import write_digits

    return built_once(tmp_path_factory, "digits_three", lambda out: write_digits(out, size=32, classes=[0, 1, 7]))


LIGHT_AUGMENT = dict(flip="none", rotation=0.03, shift=0.05, zoom=0.05, contrast=0.0)


def train_run(out: Path, data: Path, **overrides):
    """A real, tiny training run (MobileNetV2, 32 px, no ImageNet weights, 2 + 1 epochs) written to ``out``."""
    from transferkit.training.config import AugmentConfig, TrainConfig
    from transferkit.training.train import train

    settings = dict(data=str(data), out=str(out), image_size=32, weights="none", epochs=2, fine_tune_epochs=1,
                    batch_size=32, augment=AugmentConfig(**LIGHT_AUGMENT), unfreeze="30")
    settings.update(overrides)
    return train(TrainConfig(**settings), log=lambda line: None)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits_three):
    """A run that learned (digits 0, 1, 7 from scratch; its test accuracy depends on the CPU: 0.97 on an AMD EPYC,
    0.78 on an AMX Xeon), shared by the training, export, service and benchmark tests, and trained once per test
    run for every worker. No test assumes its accuracy: they compare answers with the run's own."""
    from transferkit.training.train import TrainResult

    def build(out: Path) -> None:
        # Label smoothing off: measured on this run, 0.1 costs ~9 points in a 6-epoch scratch run (0.93 -> 0.85).
        train_run(out, digits_three, strategy="scratch", epochs=6, label_smoothing=0.0)

    run_dir = built_once(tmp_path_factory, "trained_run", build)
    return TrainResult(run_dir=run_dir, metrics=json.loads((run_dir / "metrics.json").read_text()),
                       config=json.loads((run_dir / "config.json").read_text()))


@pytest.fixture(scope="session")
def bundle(trained_run, tmp_path_factory) -> Path:
    """``transferkit export`` of the trained run (default formats), once per test run, registered as
    ``digits-test`` in this worker's BentoML store."""
    from transferkit.core.manifest import read_manifest
    from transferkit.export.bundle import register_bundle

    def build(out: Path) -> None:
        result = run_cli("export", str(trained_run.run_dir), "--out", str(out), "--name", "digits-test",
                         "--no-register")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "| onnx-fp16 |" in result.stdout

    out = built_once(tmp_path_factory, "bundle", build)
    register_bundle(out, read_manifest(out))
    return out


def include_top_parameters(row, features: int) -> int:
    """What ``include_top=True`` adds to the headless network in keras.applications: the 1000-way classifier on the
    pooled features (a Dense layer, or MobileNet's 1x1 Conv2D: the same count), after VGG's two 4096-unit layers on
    the flattened 7x7x512 map of a 224 px input. A headless build plus this is the published count: one build per
    backbone instead of two, the full one at 224-331 px being the slower."""
    if row.family in ("vgg16", "vgg19"):
        return (7 * 7 * 512 + 1) * 4096 + (4096 + 1) * 4096 + (4096 + 1) * 1000
    return (features + 1) * 1000
