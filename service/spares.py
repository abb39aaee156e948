"""The batched layout's spare model services: room for models loaded after the start.

BentoML fixes a service's dependencies when it starts, and the batched layout runs a model service per model, so a
model the service did not start with had nowhere to run. With ``TRANSFERKIT_SPARE_MODELS=N`` the service starts N
more model services holding nothing (``transferkit-model-spare-I``); a load of a new name through model control
(service/control.py) gives it the first spare that is free, for the service's life. The assignment is a file in the
server's control folder, written whole and created once, one assignment at a time under a file lock (two entry workers
loading the same new name at once get the same spare): every entry worker finds a spare's model by name there, and
the spare's processes apply that model's requests.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from transferkit.core.errors import ServiceError
from transferkit.core.repository import ModelSource
from transferkit.service.reload import read_json, write_json

FOLDER = "spares"


def assignments(control_dir: Path | None) -> dict[str, tuple[int, ModelSource]]:
    """Model name -> (its spare's index, where it was first loaded from), for every spare given a model so far (a
    name found twice, which :func:`assign` prevents, keeps its lowest spare)."""
    found: dict[str, tuple[int, ModelSource]] = {}
    if control_dir is None:
        return found
    files = [path for path in (control_dir / FOLDER).glob("*.json") if path.stem.isdigit()]
    for path in sorted(files, key=lambda path: int(path.stem)):
        value = read_json(path)
        if value:
            found.setdefault(value["model"], (int(path.stem), ModelSource.from_dict(value["source"])))
    return found


@contextlib.contextmanager
def _assigning(folder: Path) -> Iterator[None]:
    """One assignment at a time among the entry workers (each opens the lock file: flock excludes across them and
    across threads alike): two loads of one new name at once would otherwise each take a spare."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def assign(control_dir: Path, name: str, source: ModelSource, spares: int) -> int:
    """The spare that serves ``name``: the one it was given before, else the first free one (409 when none is)."""
    folder = control_dir / FOLDER
    with _assigning(folder):
        given = assignments(control_dir)
        if name in given:
            return given[name][0]
        draft = folder / f".{name}.{os.getpid()}.draft"
        write_json(draft, {"model": name, "source": source.as_dict()})
        try:
            for index in range(spares):
                try:
                    os.link(draft, folder / f"{index}.json")  # whole, or not at all
                except FileExistsError:
                    continue
                return index
        finally:
            with contextlib.suppress(OSError):
                draft.unlink()
    taken = ", ".join(sorted(given)) or "none"
    raise ServiceError(409, "load_failed", f"model {name!r} was not served at the start and every spare model "
                                           f"service is taken ({spares}: {taken}); the batched layout runs a model "
                                           "service per model: raise TRANSFERKIT_SPARE_MODELS and restart to add "
                                           "more")
