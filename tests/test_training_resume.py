"""Nothing trained is ever lost: Ctrl-C and SIGTERM keep the run for --resume, a failing report step leaves a
complete run with the failure recorded, and the run directory still appears all at once."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, run_cli_here, train_run
from transferkit.core.atomic import write_file_durably
from transferkit.core.errors import RunDirectoryError
from transferkit.training import workdir
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
    """Start ``transferkit ARGS``, send ``signum`` once ``epochs`` more epochs are saved in the work directory (in
    its phase-1 backup, which is written after the epoch's history line: the state a resumed run continues from)."""
    before = workdir.backup_epoch(work, 1)
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
        saved = workdir.backup_epoch(work, 1)
        if saved >= before + epochs:
            process.send_signal(signum)
            sent = f"with {saved} epochs saved"
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

    refused = run_cli_here(*args)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    second = _interrupt_after([*args, "--resume"], work, 2, signal.SIGTERM)
    assert second.returncode == 128 + signal.SIGTERM, second.stderr[-3000:]
    assert "terminated" in second.stderr and "resuming after epoch" in second.stdout
    assert not out.exists()

    changed = run_cli_here(*args, "--resume", "--seed", "7")
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
    result = run_cli_here(*TRAIN, "--data", str(two_digits), "--out", str(tmp_path / "nothing"), "--resume")
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


def test_a_history_line_cut_by_a_full_disk_is_dropped_on_resume(tmp_path, two_digits):
    """A full disk during the write of epoch N's line leaves it cut off, and no backup of epoch N (the line is
    written first): resume drops the line with a warning and trains epoch N again from epoch N-1's backup."""
    out, work = tmp_path / "run", tmp_path / ".run.partial"
    args = [*TRAIN, "--data", str(two_digits), "--out", str(out)]
    args[args.index("--epochs") + 1] = "3"
    first = _interrupt_after(args, work, 1, signal.SIGINT)
    assert first.returncode == 130, first.stderr[-3000:]
    saved = workdir.backup_epoch(work, 1)
    assert saved >= 1
    log = work / workdir.HISTORY_LOG
    lines = [line for line in log.read_text().splitlines() if json.loads(line)["epoch"] <= saved]
    cut = json.dumps({**json.loads(lines[-1]), "epoch": saved + 1})[:37]  # epoch N's line, cut mid-write
    log.write_text("\n".join(lines) + "\n" + cut)

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"dropped {cut[:40]!r}" in resumed.stdout and f"last complete epoch ({saved})" in resumed.stdout
    assert f"resuming after epoch {saved}" in resumed.stdout
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]  # every epoch once, the cut one trained again


def test_read_history_keeps_complete_lines_only(tmp_path):
    """On real files: a cut last line (or a NUL tail a crash can leave) is dropped and the log rewritten whole; a
    bad line before the last is corruption, refused with the line number; a whole row missing only its newline is
    kept."""
    row = {"epoch": 1, "phase": 1, "loss": 0.5, "val_loss": 0.6}
    log = tmp_path / workdir.HISTORY_LOG
    for tail in ('{"epoch": 2, "pha', "\0" * 24):
        log.write_text(json.dumps(row) + "\n" + tail)
        assert workdir.read_history(tmp_path) == [row]
        assert "resumes after the last complete epoch (1)" in workdir.repair_history(tmp_path)
        assert log.read_text() == json.dumps(row) + "\n" and workdir.repair_history(tmp_path) is None
    log.write_text(json.dumps(row))
    assert workdir.repair_history(tmp_path) is None and log.read_text() == json.dumps(row) + "\n"
    workdir.append_history(tmp_path, {**row, "epoch": 2})
    assert [r["epoch"] for r in workdir.read_history(tmp_path)] == [1, 2]
    log.write_text(json.dumps(row) + "\nnot json\n" + json.dumps({**row, "epoch": 2}) + "\n")
    with pytest.raises(RunDirectoryError, match="line 2 is not a history row"):
        workdir.read_history(tmp_path)


def test_state_files_are_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "config.json"
    write_file_durably(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n' and oct(path.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(TypeError):
        write_file_durably(path, 12)  # fails mid-write: the old file stays, no temporary file is left
    assert path.read_text() == '{"a": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_the_durable_backup_is_keras_backup_written_whole(tmp_path):
    """The backup (a Keras BackupAndRestore whose save is replaced) leaves only whole files, and a new fit resumes
    from it: a Keras upgrade that renamed what it overrides would fail here, not silently stop saving."""
    import keras
    import numpy as np

    epochs_run: list[int] = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2 and not epochs_run[2:]:
                raise KeyboardInterrupt  # the first fit stops after two saved epochs
            epochs_run.append(epoch)

    def fit():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile("adam", "mse")
        backup = workdir.backup_callback(tmp_path / workdir.BACKUP_DIR / "phase1")
        model.fit(np.ones((8, 3), np.float32), np.ones((8, 2), np.float32), epochs=4, verbose=0,
                  callbacks=[backup, Record()])
        return model

    # What DurableBackupAndRestore overrides:
    assert {"_save_model", "_load_model"} <= set(vars(keras.callbacks.BackupAndRestore))
    with pytest.raises(KeyboardInterrupt):
        fit()
    backup_dir = tmp_path / workdir.BACKUP_DIR / "phase1"
    assert sorted(p.name for p in backup_dir.iterdir()) == ["latest.npz", "training_metadata.json"]
    assert workdir.backup_epoch(tmp_path, 1) == 2
    epochs_run.append(-1)  # let the second fit run
    model = fit()
    assert epochs_run == [0, 1, -1, 2, 3]  # continued after the saved epoch 2
    # ... with the optimizer's state too: one step per epoch, two before the stop and two after.
    assert int(model.optimizer.iterations.numpy()) == 4
