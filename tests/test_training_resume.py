"""Nothing trained is ever lost: Ctrl-C and SIGTERM keep the run for --resume, a failing report step leaves a
complete run with the failure recorded, and the run directory still appears all at once."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, train_run
from transferkit.training.config import AugmentConfig
from transferkit.training.rundir import read_metrics

TRAIN = ["train", "--image-size", "32", "--weights", "none", "--alpha", "0.35", "--epochs", "7", "--patience", "20",
         "--batch-size", "16", "--no-augment", "--early-stopping-start", "0"]


@pytest.fixture(scope="module")
def two_digits(tmp_path_factory) -> Path:
    from transferkit.training.digits import write_digits

    out = tmp_path_factory.mktemp("data") / "two_digits"
    write_digits(out, size=32, classes=[0, 1], per_class=30)
    return out


def _interrupt_after(args: list[str], work: Path, epochs: int, signum: int) -> subprocess.CompletedProcess:
    """Start ``transferkit ARGS``, send ``signum`` once ``epochs`` more epochs are logged in the work directory."""
    log = work / "history.jsonl"
    before = len(log.read_text().splitlines()) if log.exists() else 0
    # SIGINT back to its default in the child: a test run started as a background job (`.ci/run &` in a script)
    # inherits SIGINT ignored, as POSIX shells set it for background jobs, and Python then keeps ignoring it. That
    # made this run finish untouched (exit 0, signal sent after epoch 1) in a clean-clone .ci/run started with `&`,
    # and most likely in the one CI run where it failed the same way. A user's Ctrl-C reaches a
    # foreground process, whose SIGINT is not ignored.
    process = subprocess.Popen([sys.executable, "-m", "transferkit", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    sent = "never"
    while time.monotonic() < deadline and process.poll() is None:
        logged = len(log.read_text().splitlines()) if log.exists() else 0
        if logged >= before + epochs:
            process.send_signal(signum)
            sent = f"with {logged} epochs logged"
            break
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=300)
    # Shown with a failure (captured output), should a run finish without the signal.
    print(f"signal {signum} sent {sent}; exit {process.returncode}; the run's output ends:\n{stdout[-1500:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_interrupted_runs_keep_their_state_and_resume(tmp_path, two_digits):
    out = tmp_path / "run"
    work = tmp_path / ".run.partial"
    args = [*TRAIN, "--data", str(two_digits), "--out", str(out)]

    first = _interrupt_after(args, work, 1, signal.SIGINT)
    assert first.returncode == 130, first.stderr[-3000:]
    assert "--resume" in first.stderr and str(work) in first.stderr
    assert not out.exists() and (work / "checkpoints" / "backup").is_dir()  # nothing half-written at --out

    refused = run_cli(*args)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    second = _interrupt_after([*args, "--resume"], work, 2, signal.SIGTERM)
    assert second.returncode == 128 + signal.SIGTERM, second.stderr[-3000:]
    assert "terminated" in second.stderr and "resuming after epoch" in second.stdout
    assert not out.exists()

    changed = run_cli(*args, "--resume", "--seed", "7")
    assert changed.returncode == 2 and "seed" in changed.stderr

    last = run_cli(*args, "--resume")
    assert last.returncode == 0, last.stderr[-3000:]
    assert out.is_dir() and not work.exists()
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(row["epoch"]) for row in rows] == list(range(1, 8))  # every epoch once, none redone
    # The schedule continued where it stopped: the last epoch ends at lr 0 (cosine over the 7-epoch budget).
    assert float(rows[-1]["epoch_end_lr"]) == pytest.approx(0.0, abs=1e-9)
    assert float(rows[2]["epoch_end_lr"]) > float(rows[3]["epoch_end_lr"]) > 0
    assert read_metrics(out).test is not None and (out / "model.keras").is_file()


def test_resume_without_a_kept_run_is_refused(tmp_path, two_digits):
    result = run_cli(*TRAIN, "--data", str(two_digits), "--out", str(tmp_path / "nothing"), "--resume")
    assert result.returncode == 2 and "no interrupted run" in result.stderr


def test_a_failing_report_step_leaves_a_complete_run(tmp_path, two_digits, monkeypatch):
    from transferkit.training import plots

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts on this machine")

    monkeypatch.setattr(plots, "confusion_matrix", broken)
    result = train_run(tmp_path / "run", two_digits, strategy="feature-extraction", fine_tune_epochs=0,
                       augment=AugmentConfig(enabled=False), cache_features=True, epochs=1)
    run_dir = result.run_dir
    for name in ("model.keras", "config.json", "split.json", "labels.json", "history.csv", "metrics.json",
                 "learning_curves.png", "misclassified.png", "report.md", "checkpoints/best.weights.h5"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "confusion_matrix.png").exists()
    failures = read_metrics(run_dir).failures
    assert [(f.step, f.error) for f in failures] == [
        ("confusion matrix plot", "RuntimeError: no fonts on this machine")]
    assert "Failed step: confusion matrix plot" in (run_dir / "report.md").read_text()
