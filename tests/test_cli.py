"""The CLI as a user meets it: help, listings, one-line errors with non-zero exits, no half-written output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import last_error_line, run_cli, run_cli_here


def test_help_explains_every_command():
    result = run_cli("--help")
    assert result.returncode == 0 and "train" in result.stdout and "data" in result.stdout
    assert "--verbose" in result.stdout and "--log-file" in result.stdout
    train_help = run_cli("train", "--help").stdout
    for flag in ("--data", "--backbone", "--weights", "--fine-tune-epochs", "--unfreeze", "--cache-features",
                 "--kfold", "--strategy", "--list-backbones", "examples:"):
        assert flag in train_help


def test_list_backbones_prints_the_registry():
    result = run_cli("train", "--list-backbones")
    assert result.returncode == 0
    rows = [line for line in result.stdout.splitlines()[2:] if line.strip()]
    assert len(rows) == 40
    assert any(line.startswith("EfficientNetB0") and "builtin" in line for line in rows)


def test_data_digits_command(tmp_path):
    result = run_cli("data", "digits", "--out", str(tmp_path / "d"), "--size", "16", "--classes", "0-2")
    assert result.returncode == 0 and "wrote 537 images of 3 classes" in result.stdout


def test_bad_inputs_exit_non_zero_with_one_readable_line(tmp_path, digits_small):
    cases = [
        (["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "data directory not found"),
        (["train", "--data", str(digits_small), "--out", str(tmp_path / "o"), "--backbone", "Nope"],
         "unknown backbone 'Nope'"),
        (["train", "--data", str(digits_small)], "needs --data DIR and --out DIR"),
        (["data", "digits", "--out", str(digits_small)], "already exists; pass --force"),
    ]
    for args, message in cases:
        result = run_cli_here(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in last_error_line(result), (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_imagenet_offline_fails_with_advice(tmp_path, digits_small):
    result = run_cli("train", "--data", str(digits_small), "--out", str(tmp_path / "o"), "--image-size", "96",
                     "--epochs", "1")
    assert result.returncode == 3, result.stderr
    line = last_error_line(result)
    assert "ImageNet weights for MobileNetV2" in line and "--weights none" in line and "~/.keras/models" in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_sigterm_during_training_leaves_nothing(tmp_path, digits_small):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferkit", "train", "--data", str(digits_small), "--out", str(out),
         "--image-size", "32", "--weights", "none", "--alpha", "0.35", "--epochs", "50", "--no-augment"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    for line in proc.stdout:
        if line.startswith("Epoch 1/") or time.time() > deadline:  # training has begun (the first step traces)
            break
    assert list(tmp_path.glob(".interrupted.partial*")), "training should be writing into a staging directory"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not out.exists()  # a trained work directory may stay beside it, for --resume


def test_verbose_shows_what_the_log_file_keeps(tmp_path, digits_small):
    """TensorFlow's C++ log lines (printed at import, e.g. CUDA probing on a CPU machine) stay off the terminal by
    default; --log-file keeps them and --verbose shows the same lines. Which lines TensorFlow prints depends on the
    machine, so the test compares the three outputs of one command that imports TensorFlow and fails fast."""
    import re

    from transferkit.core.logs import is_native_log_line

    def native(text: str) -> list[str]:  # without the timestamp and thread id
        return sorted(re.sub(r"^(\w)\d{4} [\d:.]+ +\d+ ", r"\1 ", line) for line in text.splitlines()
                      if is_native_log_line(line))

    args = ["train", "--data", str(digits_small), "--out", str(tmp_path / "o"), "--image-size", "96", "--epochs", "1"]
    quiet = run_cli("--log-file", str(tmp_path / "quiet.log"), *args)
    loud = run_cli("--verbose", *args)
    assert quiet.returncode == loud.returncode == 3, quiet.stderr  # no ImageNet weights offline
    assert native(quiet.stdout + quiet.stderr) == []
    assert native((tmp_path / "quiet.log").read_text()) == native(loud.stderr)
    assert "ImageNet weights for MobileNetV2" in last_error_line(quiet)
