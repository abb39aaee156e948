"""Write an output directory all at once, or not at all, and never replace what transferkit did not write.

Work happens in a hidden sibling directory that is renamed into place only when everything succeeded; any error,
Ctrl-C or SIGTERM (turned into SystemExit by the CLI, and recorded: core/stopping.py) removes it. A reader never
sees a half-written run or bundle.

Every directory transferkit publishes carries a marker file (:data:`MARKER`). ``--force`` replaces an existing
output only when it holds that marker, and never the current directory, the home directory, the filesystem root or
one of the command's inputs, marker or not: one mistyped path must not cost a dataset or a home folder.

Single files that a later run depends on (a training run's resume state) are written durably: to a temporary file,
flushed, renamed, and the directory flushed (:func:`write_file_durably`, :func:`replace_durably`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from transferkit.core.errors import OutputExistsError
from transferkit.core.stopping import raise_if_stop_requested

MARKER = ".transferkit-output"
logger = logging.getLogger(__name__)


def mark_output(directory: Path) -> None:
    """Write the marker that lets a later ``--force`` replace ``directory``."""
    import transferkit

    record = {"written_by": f"transferkit {transferkit.__version__}",
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (Path(directory) / MARKER).write_text(json.dumps(record) + "\n")


def is_marked(directory: Path) -> bool:
    return (Path(directory) / MARKER).is_file()


def fsync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries to disk: a rename or a new file is durable only once its directory is (POSIX).
    Best effort where a system cannot open or fsync a directory (Windows, some network filesystems)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # EINVAL: this filesystem does not sync directories
        pass
    finally:
        os.close(fd)


def replace_durably(temporary: Path, path: Path) -> None:
    """Rename the finished file ``temporary`` over ``path`` so that, after a crash or a power cut, ``path`` is the
    old file or the whole new one: its data is flushed before the rename, the rename after it (for files another
    library wrote, e.g. Keras weights)."""
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    fsync_directory(Path(path).parent)


def write_file_durably(path: Path, content: bytes | str, mode: int = 0o644) -> None:
    """Write ``path`` whole or not at all, durably: a temporary file beside it, fsync, rename, fsync of the
    directory. A full disk or a crash mid-write leaves the previous ``path`` intact (and no temporary file)."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)  # mkstemp creates 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _refuse_precious(out: Path, protected: Iterable[Path]) -> None:
    """Refuse to replace a place whose loss no --force can justify: it, or something inside it, is the current
    directory, the home directory, the filesystem root or one of the command's inputs."""
    target = out.resolve()
    places = [(Path.cwd(), "the current directory"), (Path.home(), "the home directory"),
              (Path(target.anchor), "the filesystem root")]
    places += [(Path(path), f"an input of this command ({path})") for path in protected]
    for place, what in places:
        place = place.resolve()
        if target == place or target in place.parents:
            raise OutputExistsError(f"{out} is or contains {what}: transferkit will not replace it, even with "
                                    "--force; choose a new output path")


def check_output_dir(out: Path, force: bool, protected: Iterable[Path] = ()) -> Path:
    """Fail early (before hours of work) if ``out`` exists and may not be replaced; ``protected`` are the command's
    inputs, which ``out`` may never be or contain."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    if out.exists():
        _refuse_precious(out, protected)
        if not is_marked(out):
            raise OutputExistsError(f"{out} exists and transferkit did not write it (no {MARKER} file in it): "
                                    "--force replaces only transferkit's own outputs; choose another path, or "
                                    "move it away yourself")
    return out


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if rename is None:
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if rename(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem without exchange (e.g. some FUSE)
        return False
    raise OSError(code, os.strerror(code), str(second))


def publish_dir(staging: Path, out: Path) -> Path:
    """Mark the finished ``staging`` directory and rename it to ``out``. An existing ``out`` is swapped with it in
    one step where the system can (then the old one, now at ``staging``, is deleted), so ``out`` never goes missing;
    elsewhere the old one is moved aside first (two renames)."""
    mark_output(staging)
    if not out.exists():
        os.replace(staging, out)
    elif _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)
    else:
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    return out


def leftovers(out: Path) -> list[Path]:
    """Staging and set-aside directories of earlier writes of ``out`` that a SIGKILL or a power cut left beside it."""
    return sorted(path for pattern in (f".{out.name}.partial-*", f".{out.name}.old-*")
                  for path in out.parent.glob(pattern) if path.is_dir())


def report_leftovers(out: Path) -> None:
    """Say where an interrupted write left its directory. Reported, not deleted: another transferkit command may be
    writing ``out`` at this moment, and its staging directory looks the same."""
    for path in leftovers(out):
        logger.warning("%s was left by an interrupted write of %s; delete it unless another transferkit command is "
                       "writing there now", path, out.name)


@contextmanager
def atomic_output_dir(out: Path, force: bool = False, protected: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block succeeds (see :func:`check_output_dir`)."""
    out = check_output_dir(out, force, protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    report_leftovers(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        raise_if_stop_requested()  # a signal whose exception a library swallowed must not publish the output
        staging.chmod(0o755)  # mkdtemp creates 0700
        check_output_dir(out, force, protected)  # someone may have created it meanwhile
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
