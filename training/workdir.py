"""Where a run lives while it trains: a kept work directory that becomes the run directory in one rename.

``<out>/../.<name>.partial/`` holds the run while it is being made: config, split, per-epoch history and the
Keras ``BackupAndRestore`` state, then the saved model, then the reports. Only when everything is written is it
renamed to ``<out>``, so a reader never sees a half-written run. It is *not* deleted when training is interrupted
or fails after an epoch was saved: ``--resume`` continues it. A work directory with nothing trained in it is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transferkit.core.atomic import check_output_dir, publish_dir
from transferkit.core.errors import OutputExistsError, TransferkitError, UsageError

HISTORY_LOG = "history.jsonl"
BACKUP_DIR = "checkpoints/backup"


class RunInterrupted(TransferkitError):
    """Training stopped (Ctrl-C, SIGTERM or an error) with its state kept for ``--resume``."""

    exit_code = 130
    reason = "interrupted"


def work_dir_for(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial"


def prepare(out: Path, force: bool, resume: bool, data: Path | None = None) -> Path:
    """Check ``out`` and its work directory for a new run (or a resumed one); returns the work directory path.
    ``out`` may never be or contain the dataset ``data``, even with ``force``."""
    protected = [data] if data else []
    out = Path(out).absolute()
    work = work_dir_for(out)
    if resume:
        if not work.is_dir():
            done = " (it is complete)" if out.is_dir() else ""
            raise UsageError(f"--resume: no interrupted run of {out} to continue{done}; expected {work}")
        check_output_dir(out, force, protected)
        return work
    check_output_dir(out, force, protected)
    if work.exists():
        if not force:
            raise OutputExistsError(f"an interrupted run of {out} is kept in {work}: continue it with --resume, "
                                    "or pass --force to start over")
        check_output_dir(work, force, protected)  # the same rule as any output: only a marked one is removed
        shutil.rmtree(work)
    return work


def has_trained_state(work: Path) -> bool:
    """Whether ``work`` holds something worth resuming: a finished epoch or a saved model."""
    log = work / HISTORY_LOG
    return (work / "model.keras").is_file() or (log.is_file() and log.stat().st_size > 0)


def discard_if_untrained(work: Path) -> bool:
    """Remove ``work`` unless it holds trained state; returns whether it was kept."""
    if work.exists() and not has_trained_state(work):
        shutil.rmtree(work, ignore_errors=True)
        return False
    return work.exists()


def append_history(work: Path, row: dict) -> None:
    with (work / HISTORY_LOG).open("a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_history(work: Path) -> list[dict]:
    """Rows logged so far, one per epoch (the last row of an epoch wins: a resumed epoch is logged again)."""
    path = work / HISTORY_LOG
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["epoch"]] = row
    return [rows[k] for k in sorted(rows)]


def finalize(work: Path, out: Path, force: bool) -> Path:
    """Rename the finished ``work`` directory to ``out`` (replacing it with ``force``)."""
    out = check_output_dir(Path(out), force)
    shutil.rmtree(work / BACKUP_DIR, ignore_errors=True)
    (work / HISTORY_LOG).unlink(missing_ok=True)  # history.csv holds the same rows
    work.chmod(0o755)
    return publish_dir(work, out)
