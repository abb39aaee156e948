"""Where a run lives while it trains: a kept work directory that becomes the run directory in one rename.

``<out>/../.<name>.partial/`` holds the run while it is being made: config, split, per-epoch history and the
Keras ``BackupAndRestore`` state, then the saved model, then the reports. Only when everything is written is it
renamed to ``<out>``, so a reader never sees a half-written run. It is *not* deleted when training is interrupted
or fails after an epoch was saved: ``--resume`` continues it. A work directory with nothing trained in it is removed.

The resume state survives a crash or a full disk: every state file is written durably (temporary file, fsync,
rename, fsync of the directory: core/atomic.py), the history log is fsynced line by line, and an epoch is logged
*before* its backup is saved, so the backup never runs ahead of the log. A history line cut off mid-write is
dropped on resume (:func:`repair_history`) and that epoch is trained again from the previous epoch's backup.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from transferkit.core.atomic import (
    check_output_dir,
    fsync_directory,
    publish_dir,
    replace_durably,
    write_file_durably,
)
from transferkit.core.errors import OutputExistsError, RunDirectoryError, TransferkitError, UsageError

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
    """Log one finished epoch as a JSON line, on disk before training goes on (appending to a log is durable line by
    line; a crash or a full disk can cut only the line being written, which :func:`read_history` drops)."""
    path = work / HISTORY_LOG
    created = not path.exists()
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_directory(work)


def _history_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    valid = isinstance(row, dict) and isinstance(row.get("epoch"), int) and "phase" in row
    return row if valid else None


def _parse_history(path: Path) -> tuple[list[dict], str | None, bool]:
    """(every complete row in log order, the cut-off last line or None, whether the log ends with a newline).

    Only the last line may be unreadable: it is the one a full disk or a crash interrupted (a tail of NUL bytes, left
    by a crash on some filesystems, counts as such a line). An unreadable line before it is a corrupt log."""
    text = path.read_bytes().decode("utf-8", "replace")
    lines = [line for line in text.split("\n") if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        row = _history_row(line)
        if row is not None:
            rows.append(row)
        elif number == len(lines):
            return rows, line, text.endswith("\n")
        else:
            raise RunDirectoryError(f"{path}: line {number} is not a history row ({line[:60]!r}): the log is "
                                    "corrupt, not interrupted; start the run over with --force")
    return rows, None, text.endswith("\n") or not text


def read_history(work: Path) -> list[dict]:
    """Rows logged so far, one per epoch (the last row of an epoch wins: a resumed epoch is logged again). A last
    line cut off mid-write is left out (see :func:`repair_history`)."""
    path = work / HISTORY_LOG
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    for row in _parse_history(path)[0]:
        rows[row["epoch"]] = row
    return [rows[k] for k in sorted(rows)]


def repair_history(work: Path) -> str | None:
    """Before resuming: rewrite the history log without a cut-off last line (durably), so the next epoch's line does
    not continue it. Returns the warning to show, or None when the log was whole."""
    path = work / HISTORY_LOG
    if not path.is_file():
        return None
    rows, cut, ends_cleanly = _parse_history(path)
    if cut is None and ends_cleanly:
        return None
    write_file_durably(path, "".join(json.dumps(row) + "\n" for row in rows))
    if cut is None:  # a whole last row that only lost its newline: nothing was dropped
        return None
    last = max((row["epoch"] for row in rows), default=0)
    return (f"the last line of {path} was cut off while it was written (a full disk or a crash?): dropped "
            f"{cut[:40]!r}...; the run resumes after the last complete epoch ({last}) and trains the next again")


def save_durably(path: Path, save: Callable[[str], None]) -> None:
    """``save(temporary)`` (a Keras save call), then rename it over ``path`` durably. The temporary name keeps the
    suffix Keras checks (``.keras``, ``.weights.h5``)."""
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    temporary = path.with_name(f".{path.name[:len(path.name) - len(suffix)]}.partial{suffix}")
    save(str(temporary))
    replace_durably(temporary, path)


def backup_epoch(work: Path | None, phase: int) -> int:
    """The epoch the phase's backup was saved after (Keras's ``training_metadata.json``), 0 when there is none: a
    resumed phase continues from there, whatever the history log holds beyond it."""
    if work is None:
        return 0
    try:
        return int(json.loads((work / BACKUP_DIR / f"phase{phase}" / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def backup_callback(directory: Path):
    """Keras's ``BackupAndRestore``, saving durably and fast.

    Keras writes its weights and its metadata in place, so a crash or a full disk mid-save leaves a truncated file and
    no backup to resume from; here each goes to a temporary file that is flushed and renamed. The weights are renamed
    first: a crash between the two renames makes a resumed run train the last epoch once more on top of its weights,
    never skip one. And the state is one ``.npz`` of the model's and the optimizer's variables in order, instead of
    Keras's ``save_weights``, which walks every layer into an HDF5 group: 0.55 s per epoch for a 32-px MobileNetV2
    (a fifth of its training time on two cores), against a few hundredths."""
    import keras

    class DurableBackupAndRestore(keras.callbacks.BackupAndRestore):
        def __init__(self, backup_dir: str) -> None:
            super().__init__(backup_dir)
            self._weights_path = os.path.join(backup_dir, "latest.npz")

        def _variables(self) -> list:
            """What a resumed run continues from: every model variable (BatchNormalization's statistics too), then
            the optimizer's (its step count and moments), in their creation order, the same in every process."""
            optimizer = self.model.optimizer
            return list(self.model.weights) + (list(optimizer.variables) if optimizer is not None else [])

        def _save_model(self) -> None:  # Keras 3's one saving method (epoch end, or every save_freq batches)
            os.makedirs(self.backup_dir, exist_ok=True)
            arrays = {f"v{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(self._variables())}

            def save(path: str) -> None:
                with open(path, "wb") as stream:  # a file object: numpy adds no ".npz" to the name
                    np.savez(stream, **arrays)

            save_durably(Path(self._weights_path), save)
            metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen}
            write_file_durably(Path(self._training_metadata_path), json.dumps(metadata))

        def _load_model(self) -> None:
            if os.path.exists(self._weights_path):
                optimizer = self.model.optimizer
                if optimizer is not None and not optimizer.built:
                    optimizer.build(self.model.trainable_variables)
                _assign(self._variables(), Path(self._weights_path))
            if os.path.exists(self._training_metadata_path):
                with open(self._training_metadata_path) as stream:
                    self.model._initial_epoch = json.loads(stream.read())["epoch"]

    return DurableBackupAndRestore(str(directory))


def _assign(variables: list, path: Path) -> None:
    """Set ``variables`` from a backup written by :func:`backup_callback`, refusing one that does not fit."""
    with np.load(path) as stored:
        arrays = [stored[f"v{i}"] for i in range(len(stored.files))]
    shapes = [tuple(v.shape) for v in variables]
    if [a.shape for a in arrays] != shapes:
        raise RunDirectoryError(f"the backup {path} does not fit this model ({len(arrays)} arrays for "
                                f"{len(variables)} variables): the run cannot resume; start it again without --resume")
    for variable, array in zip(variables, arrays):
        variable.assign(array)


def finalize(work: Path, out: Path, force: bool) -> Path:
    """Rename the finished ``work`` directory to ``out`` (replacing it with ``force``)."""
    out = check_output_dir(Path(out), force)
    shutil.rmtree(work / BACKUP_DIR, ignore_errors=True)
    (work / HISTORY_LOG).unlink(missing_ok=True)  # history.csv holds the same rows
    work.chmod(0o755)
    return publish_dir(work, out)
