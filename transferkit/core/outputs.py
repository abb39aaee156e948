"""Result files of ``transferkit predict --out``: CSV, JSONL or Parquet (by extension), one row per image.

Every format has the same columns: ``path``, ``label``, ``score``, ``top_k`` (a list of ``{label, score}``; JSON text
in CSV), ``error`` (empty when the image was classified) and, with ``--evaluate``, ``true_label``. Rows are written
as batches finish and flushed, so an interrupted run leaves a file that ``--resume`` continues: CSV and JSONL are
appended to (a line cut short by a crash is dropped first); Parquet, which cannot be appended to, is rewritten
through a temporary file that replaces the original when the run stops, including on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from transferkit.core.errors import UsageError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
COLUMNS = ("path", "label", "score", "top_k", "error")


def output_format(path: Path) -> str:
    """``csv``, ``jsonl`` or ``parquet`` from the file name; UsageError for anything else."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"--out {path}: unknown extension {path.suffix or '(none)'}; use .csv, .jsonl or .parquet")
    return fmt


class RowWriter(Protocol):
    def write(self, rows: list[dict]) -> None: ...

    def close(self) -> None: ...


def _normalise(row: dict, columns: tuple[str, ...]) -> dict:
    return {column: row.get(column) for column in columns}


def _drop_cut_line(path: Path) -> None:
    """A process killed mid-write can leave a last line without its newline: cut it so appending starts clean."""
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        # Scan back for the last newline (in blocks, the file may be large).
        position = size
        while position > 0:
            start = max(0, position - 65536)
            handle.seek(start)
            block = handle.read(position - start)
            index = block.rfind(b"\n")
            if index >= 0:
                handle.truncate(start + index + 1)
                return
            position = start
        handle.truncate(0)


class CsvWriter:
    def __init__(self, path: Path, columns: tuple[str, ...], append: bool):
        if append and path.exists():
            _drop_cut_line(path)
        fresh = not (append and path.exists() and path.stat().st_size > 0)
        self._handle = path.open("a" if append else "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._handle, fieldnames=columns)
        self._columns = columns
        if fresh:
            self._writer.writeheader()

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            row = _normalise(row, self._columns)
            if row.get("top_k") is not None:
                row["top_k"] = json.dumps(row["top_k"])
            self._writer.writerow(row)
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class JsonlWriter:
    def __init__(self, path: Path, columns: tuple[str, ...], append: bool):
        if append and path.exists():
            _drop_cut_line(path)
        self._handle = path.open("a" if append else "w", encoding="utf-8")
        self._columns = columns

    def write(self, rows: list[dict]) -> None:
        self._handle.writelines(json.dumps(_normalise(row, self._columns)) + "\n" for row in rows)
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _arrow_schema(columns: tuple[str, ...]):
    import pyarrow as pa

    types = {
        "path": pa.string(), "label": pa.string(), "score": pa.float64(),
        "top_k": pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())])),
        "error": pa.string(), "true_label": pa.string(),
    }
    return pa.schema([(column, types[column]) for column in columns])


class ParquetWriter:
    """Writes ``PATH.partial`` and renames it over ``PATH`` on close; resuming first copies the old rows over."""

    def __init__(self, path: Path, columns: tuple[str, ...], append: bool):
        import pyarrow.parquet as pq

        self._path = path
        self._partial = path.with_name(path.name + ".partial")
        self._columns = columns
        self._schema = _arrow_schema(columns)
        self._writer = pq.ParquetWriter(self._partial, self._schema)
        if append and path.exists():
            old = pq.ParquetFile(path)
            for index in range(old.num_row_groups):
                self._writer.write_table(old.read_row_group(index).select(list(columns)).cast(self._schema))

    def write(self, rows: list[dict]) -> None:
        import pyarrow as pa

        if rows:
            self._writer.write_table(pa.Table.from_pylist([_normalise(r, self._columns) for r in rows],
                                                          schema=self._schema))

    def close(self) -> None:
        self._writer.close()
        os.replace(self._partial, self._path)


def written_by_transferkit(path: Path) -> bool:
    """Whether ``path`` starts like a file ``transferkit predict`` wrote (its first row or schema names the output
    columns), so that ``--force`` may replace it: a user's own table with the same extension may not be."""
    fmt = output_format(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
        elif fmt == "csv":
            with path.open(newline="", encoding="utf-8") as handle:
                names = next(csv.reader(handle), [])
        else:
            with path.open(encoding="utf-8") as handle:
                names = list(json.loads(handle.readline() or "{}"))
    except Exception:  # unreadable, not UTF-8, not JSON, not Parquet (or no pyarrow): not ours to replace
        return False
    return tuple(names[: len(COLUMNS)]) == COLUMNS


def open_writer(path: Path, append: bool, columns: tuple[str, ...] = COLUMNS) -> RowWriter:
    """The writer for ``path``'s format; ``append`` continues an existing file (``--resume``)."""
    writers = {"csv": CsvWriter, "jsonl": JsonlWriter, "parquet": ParquetWriter}
    return writers[output_format(path)](path, columns, append)


def _paths_in(path: Path, fmt: str) -> Iterator[str]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=["path"]):
            yield from batch.column(0).to_pylist()
    elif fmt == "csv":
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row.get("path") and None not in row.values():  # a row cut short by a crash has missing cells
                    yield row["path"]
    else:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    yield json.loads(line)["path"]
                except (ValueError, KeyError, TypeError):
                    continue  # the cut last line of an interrupted run


def done_paths(path: Path) -> set[str]:
    """Absolute paths already present in an output file (for ``--resume``); empty if it does not exist."""
    if not path.exists():
        return set()
    fmt = output_format(path)
    try:
        return {os.path.abspath(p) for p in _paths_in(path, fmt) if p}
    except Exception as exc:  # pyarrow / csv raise their own errors for a file that is not what its name says
        raise UsageError(f"--resume: cannot read {path} as {fmt}: {str(exc).splitlines()[0]}") from None
