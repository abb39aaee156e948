"""Result files of ``transferkit predict --out``: CSV, JSONL or Parquet (by extension), one row per image.

Every format has the same columns: ``path``, ``label``, ``score``, ``top_k`` (a list of ``{label, score}``; JSON text
in CSV), ``error`` (empty when the image was classified) and, with ``--evaluate``, ``true_label``.

Paths. ``path`` is the input's absolute path, symbolic links kept as the user reached the file (so the folder names
``--evaluate`` reads stay theirs). ``--resume`` compares :func:`path_key` of both sides: the real path of the file's
folder, every symbolic link resolved, plus its name, so a run resumed from another working directory, or with an input
spelled differently (relative, through a linked folder, with ``..``), skips what is done. The file's own name is not
resolved: two links to one image are two inputs, each with its row. A name that is not valid UTF-8 (bytes a Linux
file system allows; Python keeps them as surrogate escapes) is written with each undecodable byte as ``\\xNN`` (what
Python's ``backslashreplace`` shows), so every file stays valid UTF-8 for any reader, and :func:`stored_path` maps it
back to the file (``--resume``, and path lists given as inputs).

Durability. Rows are written as batches finish. CSV and JSONL are appended to, flushed and fsynced after each batch;
a line cut short by a crash is dropped before appending. Parquet keeps its row index in a footer written last, so
a file being written is unreadable until closed: each batch is written as its own Parquet file (one row group) in
``FILE.parts/``, under a temporary name, fsynced, then renamed, so a part is complete or absent whatever stops the
process, SIGKILL and power loss included. When the run ends (Ctrl-C and SIGTERM too) the rows already in ``FILE``
and the parts are merged into ``FILE.partial``, fsynced and renamed over ``FILE`` in one step; the merged file
records the last part it holds, so a crash after that rename and before the parts are deleted duplicates nothing.
``--resume`` reads ``FILE`` and the parts a killed run left, and merges them with its own at its end. A killed run
loses at most its batches in flight. Parts (rather than row groups appended to one file) because a Parquet file
without its footer cannot be read back by any reader, and rebuilding one from its page headers is fragile.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from transferkit.core.errors import UsageError

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
COLUMNS = ("path", "label", "score", "top_k", "error")
TEXT_COLUMNS = ("path", "error", "true_label")  # cells that may carry a file name
MERGED_KEY = b"transferkit.merged_through"  # Parquet metadata: the last part number merged into the file
MERGED_ROW_GROUP = 65536  # rows per row group of a merged file (a batch's few rows each would bloat its footer)
_ESCAPED_BYTE = re.compile(rb"\\x([0-9a-f]{2})")
_PART = re.compile(r"part-(\d{8})\.parquet")


def output_format(path: Path) -> str:
    """``csv``, ``jsonl`` or ``parquet`` from the file name; UsageError for anything else."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"--out {path}: unknown extension {path.suffix or '(none)'}; use .csv, .jsonl or .parquet")
    return fmt


def display_path(path: str) -> str:
    """``path`` as text that is valid UTF-8: undecodable bytes of a file name become ``\\xNN``."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        try:
            return os.fsencode(path).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate no file system name produces: show it, escaped
            return path.encode("utf-8", "backslashreplace").decode("utf-8")


def stored_path(text: str) -> str:
    """The file a :func:`display_path` text names: itself, unless it holds ``\\xNN`` escapes and does not exist as
    written, in which case the escapes are read back as the name's bytes."""
    if "\\x" not in text or os.path.lexists(text):
        return text
    raw = _ESCAPED_BYTE.sub(lambda match: bytes([int(match.group(1), 16)]), text.encode("utf-8"))
    return os.fsdecode(raw)


class PathKey:
    """:func:`path_key` with each folder resolved once (``realpath`` is one system call per path component, and a
    resume compares every input and every row)."""

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        folder, name = os.path.split(path)
        if name in ("", ".", ".."):
            return os.path.realpath(path)
        real = self._folders.get(folder)
        if real is None:
            real = self._folders[folder] = os.path.realpath(folder or ".")
        return os.path.join(real, name)


def path_key(path: str) -> str:
    """What identifies an input across runs: its folder's real path (links resolved, from any working directory)
    joined with its name."""
    return PathKey()(path)


def absolute_path(path: str) -> str:
    """``path`` made absolute as the user reached it: normalised, except across ``..`` (after a linked folder,
    ``link/..`` is not the folder that holds ``link``)."""
    if ".." in Path(path).parts:
        return os.path.join(os.getcwd(), path)
    return os.path.abspath(path)


class RowWriter(Protocol):
    def write(self, rows: list[dict]) -> None: ...

    def close(self) -> None: ...


def _normalise(row: dict, columns: tuple[str, ...]) -> dict:
    row = {column: row.get(column) for column in columns}
    for column in TEXT_COLUMNS:
        if isinstance(row.get(column), str):
            row[column] = display_path(row[column])
    return row


def _fsync_dir(path: Path) -> None:
    """Make a created, renamed or removed entry of ``path`` survive a power loss."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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


class _TextWriter:
    """CSV and JSONL: appended to, each batch flushed and fsynced."""

    def __init__(self, path: Path, columns: tuple[str, ...], append: bool):
        if append and path.exists():
            _drop_cut_line(path)
        self._fresh = not (append and path.exists() and path.stat().st_size > 0)
        self._handle = path.open("a" if append else "w", newline="", encoding="utf-8")
        self._columns = columns
        _fsync_dir(path.parent)  # the file's entry itself, once

    def write(self, rows: list[dict]) -> None:
        self._write([_normalise(row, self._columns) for row in rows])
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def _write(self, rows: list[dict]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._handle.close()


class CsvWriter(_TextWriter):
    def __init__(self, path: Path, columns: tuple[str, ...], append: bool):
        super().__init__(path, columns, append)
        self._writer = csv.DictWriter(self._handle, fieldnames=columns)
        if self._fresh:
            self._writer.writeheader()

    def _write(self, rows: list[dict]) -> None:
        for row in rows:
            if row.get("top_k") is not None:
                row["top_k"] = json.dumps(row["top_k"])
            self._writer.writerow(row)


class JsonlWriter(_TextWriter):
    def _write(self, rows: list[dict]) -> None:
        self._handle.writelines(json.dumps(row) + "\n" for row in rows)


def _arrow_schema(columns: tuple[str, ...]) -> pa.Schema:
    import pyarrow as pa

    types = {
        "path": pa.string(), "label": pa.string(), "score": pa.float64(),
        "top_k": pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())])),
        "error": pa.string(), "true_label": pa.string(),
    }
    return pa.schema([(column, types[column]) for column in columns])


def parts_dir(path: Path) -> Path:
    """Where a Parquet output's batches wait to be merged into it."""
    return path.with_name(path.name + ".parts")


def _part_numbers(parts: Path) -> list[int]:
    if not parts.is_dir():
        return []
    return sorted(int(match.group(1)) for name in os.listdir(parts) if (match := _PART.fullmatch(name)))


def _merged_through(path: Path) -> int:
    """The last part number merged into ``path`` (0 for none, or a file written before parts existed)."""
    import pyarrow.parquet as pq

    if not path.exists():
        return 0
    metadata = pq.read_schema(path).metadata or {}
    return int(metadata.get(MERGED_KEY, b"0"))


def _remove_parts(parts: Path) -> None:
    """Delete a parts folder: only the files a ParquetWriter writes there (parts and their temporary names)."""
    if not parts.is_dir():
        return
    for name in os.listdir(parts):
        if _PART.fullmatch(name) or (name.startswith(".part-") and name.endswith(".tmp")):
            (parts / name).unlink()
    try:
        parts.rmdir()
    except OSError:  # something else was put there: left for its owner
        return
    _fsync_dir(parts.parent)


@dataclass
class _Parquet:
    """What a Parquet output holds on disk: ``path`` (merged rows) and the parts not merged into it yet."""

    path: Path
    merged_through: int = 0
    parts: list[Path] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> _Parquet:
        through = _merged_through(path)
        folder = parts_dir(path)
        return cls(path, through, [folder / f"part-{n:08d}.parquet" for n in _part_numbers(folder) if n > through])

    def tables(self, columns: tuple[str, ...], schema: pa.Schema) -> Iterator[pa.Table]:
        """Every row, in order: the merged file's, then each part's."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.path.exists():
            for batch in pq.ParquetFile(self.path).iter_batches(columns=list(columns)):
                yield pa.Table.from_batches([batch]).cast(schema)
        for part in self.parts:
            yield pq.read_table(part, columns=list(columns)).cast(schema)


def _coalesced(tables: Iterable[pa.Table], rows: int = MERGED_ROW_GROUP) -> Iterator[pa.Table]:
    """Tables of about ``rows`` rows from many small ones (one row group each in the merged file)."""
    import pyarrow as pa

    pending, count = [], 0
    for table in tables:
        pending.append(table)
        count += table.num_rows
        if count >= rows:
            yield pa.concat_tables(pending)
            pending, count = [], 0
    if pending:
        yield pa.concat_tables(pending)


def _merge(path: Path, columns: tuple[str, ...], keep: Callable[[str], bool] | None = None) -> None:
    """Write ``path``'s rows and its parts' (those whose path ``keep`` accepts) to ``path`` in one replace, then
    delete the parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    state = _Parquet.read(path)
    if keep is None and not state.parts and path.exists():  # nothing new (a resume with nothing left to do)
        _remove_parts(parts_dir(path))
        return
    schema = _arrow_schema(columns)
    through = max([state.merged_through, *_part_numbers(parts_dir(path))])
    partial = path.with_name(path.name + ".partial")
    tables = state.tables(columns, schema)
    if keep is not None:
        tables = (table.filter(pa.array([keep(p) for p in table.column("path").to_pylist()], pa.bool_()))
                  for table in tables)
    with pq.ParquetWriter(partial, schema.with_metadata({MERGED_KEY: str(through).encode()})) as writer:
        for table in _coalesced(tables):
            writer.write_table(table)
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)
    _fsync_dir(path.parent)
    _remove_parts(parts_dir(path))


class ParquetWriter:
    """Each batch a part in ``FILE.parts/`` (see the module docstring); :meth:`close` merges them into ``FILE``."""

    def __init__(self, path: Path, columns: tuple[str, ...], append: bool):
        self._path, self._columns, self._schema = path, columns, _arrow_schema(columns)
        self._parts = parts_dir(path)
        path.with_name(path.name + ".partial").unlink(missing_ok=True)  # a merge that was cut short
        if not append:  # a fresh output (or --force): an earlier run's rows are neither continued nor merged
            _remove_parts(self._parts)
            path.unlink(missing_ok=True)
        self._next = max([_merged_through(path), *_part_numbers(self._parts)]) + 1
        self._parts.mkdir(exist_ok=True)
        for name in os.listdir(self._parts):  # a part cut short by the end of an earlier run
            if name.startswith(".part-") and name.endswith(".tmp"):
                (self._parts / name).unlink()

    def write(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rows:
            return
        name = f"part-{self._next:08d}.parquet"
        temporary = self._parts / f".part-{self._next:08d}.tmp"  # a dot: readers of the folder skip it
        table = pa.Table.from_pylist([_normalise(row, self._columns) for row in rows], schema=self._schema)
        with temporary.open("wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self._parts / name)
        _fsync_dir(self._parts)
        self._next += 1

    def close(self) -> None:
        _merge(self._path, self._columns)


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


def has_output(path: Path) -> bool:
    """Whether ``--out path`` holds rows: the file, or the parts of a Parquet run that was killed before its end."""
    return path.exists() or (output_format(path) == "parquet" and bool(_part_numbers(parts_dir(path))))


def open_writer(path: Path, append: bool, columns: tuple[str, ...] = COLUMNS,
                drop: Callable[[str], bool] | None = None) -> RowWriter:
    """The writer for ``path``'s format; ``append`` continues an existing output (``--resume``), first removing
    the rows whose path ``drop`` accepts (``--retry-failed``: they are classified again)."""
    fmt = output_format(path)
    if append and drop is not None and has_output(path):
        _drop_rows(path, fmt, drop)
    writers = {"csv": CsvWriter, "jsonl": JsonlWriter, "parquet": ParquetWriter}
    return writers[fmt](path, columns, append)


def _drop_rows(path: Path, fmt: str, drop: Callable[[str], bool]) -> None:
    """Rewrite ``path`` without the rows ``drop`` accepts, in one replace (a crash leaves the old file whole)."""
    if fmt == "parquet":
        _merge(path, COLUMNS, keep=lambda p: not drop(p))
        return
    _drop_cut_line(path)
    partial = path.with_name(path.name + ".partial")
    with path.open(newline="", encoding="utf-8") as source, partial.open("w", newline="", encoding="utf-8") as out:
        if fmt == "csv":
            reader, writer = csv.reader(source), csv.writer(out)
            header = next(reader, None)
            if header is not None:
                writer.writerow(header)
                index = header.index("path") if "path" in header else 0
                writer.writerows(row for row in reader if not (len(row) > index and drop(row[index])))
        else:
            out.writelines(line for line in source if not drop(_jsonl_path(line) or ""))
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    _fsync_dir(path.parent)


def _jsonl_path(line: str) -> str | None:
    try:
        path = json.loads(line)["path"]
    except (ValueError, KeyError, TypeError):
        return None  # the cut last line of an interrupted run
    return path if isinstance(path, str) else None


def _rows_in(path: Path, fmt: str) -> Iterator[tuple[str, str | None]]:
    """``(path, error)`` of every complete row."""
    if fmt == "parquet":
        state = _Parquet.read(path)
        for table in state.tables(("path", "error"), _arrow_schema(("path", "error"))):
            yield from zip(table.column("path").to_pylist(), table.column("error").to_pylist())
    elif fmt == "csv":
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row.get("path") and None not in row.values():  # a row cut short by a crash has missing cells
                    yield row["path"], row.get("error") or None
    else:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                    yield row["path"], row.get("error")
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # the cut last line of an interrupted run


@dataclass
class DoneRows:
    """What an output already holds, by :func:`path_key`: every row's key, and those whose error was transient."""

    keys: set[str] = field(default_factory=set)
    transient: set[str] = field(default_factory=set)


def done_rows(path: Path, is_transient: Callable[[str | None], bool], key: PathKey | None = None) -> DoneRows:
    """The rows already in an output (for ``--resume``); empty if it holds none."""
    done = DoneRows()
    if not has_output(path):
        return done
    key = key or PathKey()
    fmt = output_format(path)
    try:
        for stored, error in _rows_in(path, fmt):
            if stored:
                identity = key(stored_path(stored))  # a relative path (an older version's row): from here
                done.keys.add(identity)
                if is_transient(error):
                    done.transient.add(identity)
                else:  # a later row for the same file (a retry that worked) wins
                    done.transient.discard(identity)
    except Exception as exc:  # pyarrow / csv raise their own errors for a file that is not what its name says
        raise UsageError(f"--resume: cannot read {path} as {fmt}: {str(exc).splitlines()[0]}") from None
    return done

