"""--force replaces only what transferkit wrote, never a place whose loss no flag can justify, and in one step."""

from __future__ import annotations

import logging
from pathlib import Path

from conftest import last_error_line, run_cli, run_cli_here
from transferkit.core.atomic import MARKER, mark_output, publish_dir

SMALL = ["--classes", "0,1", "--per-class", "3", "--size", "32"]


def test_force_refuses_a_folder_transferkit_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = run_cli_here("data", "digits", "--out", str(mine), "--force", *SMALL)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"transferkit did not write it (no {MARKER} file in it)" in last_error_line(result)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_force_replaces_its_own_output_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "digits"
    assert run_cli("data", "digits", "--out", str(out), *SMALL).returncode == 0
    assert (out / MARKER).is_file()
    (out / "0" / "stale.png").write_bytes(b"old")
    again = run_cli("data", "digits", "--out", str(out), "--force", *SMALL)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (out / "0" / "stale.png").exists() and (out / MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no staging or old copy left


def test_force_never_replaces_the_current_directory_or_a_commands_input(tmp_path, bundle, digits_three):
    mark_output(tmp_path)  # even a folder transferkit wrote, when it is where the user stands
    result = run_cli_here("data", "digits", "--out", ".", "--force", *SMALL, cwd=tmp_path)
    assert result.returncode == 2 and "is or contains the current directory" in last_error_line(result)
    assert (tmp_path / MARKER).is_file()
    # The case: --report-dir pointed at the images (written by transferkit, so marked) with --force.
    result = run_cli_here("predict", str(bundle), str(digits_three), "--evaluate", "--report-dir", str(digits_three),
                     "--force", "--out", str(tmp_path / "rows.csv"))
    assert result.returncode == 2 and "an input of this command" in last_error_line(result), result.stderr[-2000:]
    assert (digits_three / MARKER).is_file() and not (tmp_path / "rows.csv").exists()


def test_publishing_over_an_output_swaps_it_in_one_step(tmp_path):
    out, staging = tmp_path / "out", tmp_path / ".out.partial"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    publish_dir(staging, out)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert Path(out / MARKER).read_text().startswith('{"written_by": "transferkit ')


def test_predict_force_replaces_only_a_file_it_wrote(tmp_path, bundle, digits_three):
    images = sorted((digits_three / "0").glob("*.png"))[:2]
    table = tmp_path / "measurements.csv"
    table.write_text("sample,value\na,1\n")
    result = run_cli_here("predict", str(bundle), *map(str, images), "--out", str(table), "--force")
    assert result.returncode == 2 and "did not write it" in last_error_line(result), result.stderr[-2000:]
    assert table.read_text() == "sample,value\na,1\n"
    rows = tmp_path / "rows.jsonl"
    for _ in range(2):  # written, then replaced by the same command with --force
        result = run_cli("predict", str(bundle), *map(str, images), "--out", str(rows), "--force")
        assert result.returncode == 0, result.stderr[-2000:]
    assert len(rows.read_text().splitlines()) == 2


def test_what_an_interrupted_write_left_is_reported_and_kept(tmp_path, caplog):
    """A SIGKILL between mkdtemp and publishing leaves the staging directory: the next write says so, deletes
    nothing (another command may own it) and still publishes."""
    left = tmp_path / ".digits.partial-k1ll3d"
    left.mkdir()
    (left / "half.png").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="transferkit.core.atomic"):
        result = run_cli_here("data", "digits", "--out", str(tmp_path / "digits"), *SMALL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{left} was left by an interrupted write of digits" in caplog.text
    assert (left / "half.png").read_bytes() == b"half" and (tmp_path / "digits" / MARKER).is_file()
