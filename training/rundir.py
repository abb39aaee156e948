"""The run directory as data: one place that reads what ``transferkit train`` wrote.

Every consumer (export, demo, batch evaluation, tests) asks this module which files form a split instead of
parsing ``split.json`` itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from transferkit.core.errors import RunDirectoryError


def _read_json(run_dir: Path, name: str) -> dict:
    path = Path(run_dir) / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirectoryError(f"{run_dir} is not a transferkit run directory: {name} is missing") from None
    except json.JSONDecodeError as exc:
        raise RunDirectoryError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def split_files(run_dir: Path, split: str = "test", data_root: Path | None = None) -> list[tuple[Path, str]]:
    """``(absolute path, class name)`` of every file the run assigned to ``split`` ("train", "val" or "test"),
    in the order ``split.json`` lists them. ``data_root`` replaces the recorded dataset root (a moved dataset)."""
    record = _read_json(run_dir, "split.json")
    root = Path(data_root) if data_root else Path(record["root"])
    return [(root / path, item["label"]) for path, item in record["files"].items() if item["split"] == split]
