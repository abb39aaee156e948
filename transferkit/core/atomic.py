"""Write an output directory all at once, or not at all.

Work happens in a hidden sibling directory that is renamed into place only when everything succeeded; any error,
Ctrl-C or SIGTERM (turned into SystemExit by the CLI, and recorded: core/stopping.py) removes it. A reader never
sees a half-written run or bundle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transferkit.core.errors import OutputExistsError
from transferkit.core.stopping import raise_if_stop_requested


def check_output_dir(out: Path, force: bool) -> Path:
    """Fail early (before hours of work) if ``out`` exists and may not be replaced."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    return out


def publish_dir(staging: Path, out: Path) -> Path:
    """Rename the finished ``staging`` directory to ``out``, replacing an existing ``out`` with two renames (the old
    one is moved aside first), so ``out`` is at every moment either the old or the new directory, never a mix."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)
    return out


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block succeeds."""
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        raise_if_stop_requested()  # a signal whose exception a library swallowed must not publish the output
        staging.chmod(0o755)  # mkdtemp creates 0700
        check_output_dir(out, force)  # someone may have created it meanwhile
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
