"""`transferkit predict` over folders, globs and lists; CSV/JSONL/Parquet outputs; --resume; --evaluate; the facade.

Real files (the digits PNGs, a corrupt PNG, a text file), the real bundle of the trained run, real onnxruntime and the
real CLI in a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import last_error_line, run_cli
from transferkit.core.errors import InvalidImageError, UsageError


def make_inputs(digits: Path, root: Path, per_class: int = 4) -> tuple[Path, list[Path]]:
    """``root/<class>/...`` with ``per_class`` real images per class (one class nested a level deeper), a corrupt PNG,
    a text file and a hidden folder; returns the folder and its real images."""
    images = []
    for index, folder in enumerate(sorted(p for p in digits.iterdir() if p.is_dir())):
        target = root / folder.name / ("nested" if index == 0 else "")
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(folder.iterdir())[:per_class]:
            images.append(Path(shutil.copy(source, target / source.name)))
    (root / "notes.txt").write_text("not an image\n")
    (root / "corrupt.png").write_bytes(images[0].read_bytes()[:80])
    (root / ".cache").mkdir()
    (root / ".cache" / "thumb.png").write_bytes(images[0].read_bytes())
    return root, images


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            row["score"] = float(row["score"]) if row["score"] else None
            row["top_k"] = json.loads(row["top_k"]) if row["top_k"] else None
            row["label"], row["error"] = row["label"] or None, row["error"] or None
        return rows
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_inputs_expand_files_folders_globs_and_lists(tmp_path, digits_three):
    from transferkit.core.inputs import expand_inputs, looks_like_image

    folder, images = make_inputs(digits_three, tmp_path / "in")
    items = list(expand_inputs([folder]))
    found = {Path(item.path).name for item in items}
    assert {p.name for p in images} <= found and {"notes.txt", "corrupt.png"} <= found
    assert "thumb.png" not in found  # hidden folders are not searched
    assert not any(item.named for item in items)  # found in a folder: sniffed, may be skipped

    (tmp_path / "list.txt").write_text(f"# two files\n{images[0]}\n\n{images[1].relative_to(tmp_path)}\n")
    (tmp_path / "list.csv").write_text(f"label,path\nx,{images[2]}\ny,{images[0]}\n")
    pattern = str(images[3].parent / "*.png")
    items = list(expand_inputs([tmp_path / "list.txt", tmp_path / "list.csv", images[0], pattern]))
    paths = [Path(item.path).resolve() for item in items]
    assert paths[:3] == [images[0].resolve(), images[1].resolve(), images[2].resolve()]  # each file once
    assert len(paths) == len(set(paths))
    assert all(item.named for item in items[:3]) and not items[-1].named
    globbed = {p.name for p in images[3].parent.glob("*.png")}
    assert {p.name for p in paths[3:]} == globbed - {p.name for p in images[:3]}

    with pytest.raises(UsageError, match="no such file"):
        list(expand_inputs([tmp_path / "missing.png"]))
    with pytest.raises(UsageError, match="no file matches"):
        list(expand_inputs([str(tmp_path / "*.webp")]))
    assert looks_like_image(images[0].read_bytes()[:16]) and not looks_like_image(b"not an image at all")


def test_folder_to_csv_jsonl_and_parquet(bundle, digits_three, tmp_path):
    from transferkit import load_bundle

    folder, images = make_inputs(digits_three, tmp_path / "in")
    outputs = {}
    for suffix in (".csv", ".jsonl", ".parquet"):
        out = tmp_path / f"rows{suffix}"
        result = run_cli("predict", str(bundle), str(folder), "--out", str(out), "--batch-size", "5", "--top-k", "2",
                         "--backend", "onnx")
        assert result.returncode == 0, result.stderr[-2000:]
        assert "non-images skipped  1: " in result.stdout and "notes.txt" in result.stdout
        assert "unreadable          1: " in result.stdout and "images/s" in result.stdout
        outputs[suffix] = read_rows(out)

    rows = outputs[".csv"]
    assert len(rows) == len(images) + 1  # every image and the corrupt file; notes.txt is skipped, not a row
    for other in (outputs[".jsonl"], outputs[".parquet"]):
        assert [r["path"] for r in other] == [r["path"] for r in rows]
        assert [r["label"] for r in other] == [r["label"] for r in rows]
        assert [r["error"] for r in other] == [r["error"] for r in rows]
        assert np.allclose([r["score"] or 0 for r in other], [r["score"] or 0 for r in rows], atol=1e-12)
    errors = [r for r in rows if r["error"]]
    assert [Path(r["path"]).name for r in errors] == ["corrupt.png"] and "PNG" in errors[0]["error"]
    assert errors[0]["label"] is None and errors[0]["top_k"] is None

    # The CLI and the facade give the same answers on the same backend.
    classifier = load_bundle(bundle, "onnx")
    expected = classifier.predict(images, top_k=2)
    by_path = {Path(r["path"]).resolve(): r for r in rows}
    for image, answer in zip(images, expected):
        row = by_path[image.resolve()]
        assert row["label"] == answer["label"] and len(row["top_k"]) == 2
        assert abs(row["score"] - answer["score"]) < 1e-6


def test_resume_continues_an_interrupted_output(bundle, digits_three, tmp_path):
    folder, images = make_inputs(digits_three, tmp_path / "in", per_class=3)
    expected = len(images) + 1
    for suffix in (".jsonl", ".parquet", ".csv"):
        out = tmp_path / f"rows{suffix}"
        first = run_cli("predict", str(bundle), *[str(p) for p in images[:4]], "--out", str(out))
        assert first.returncode == 0, first.stderr[-2000:]
        if suffix != ".parquet":  # a process killed mid-line leaves a cut last line
            out.write_bytes(out.read_bytes()[:-15])
        again = run_cli("predict", str(bundle), str(folder), "--out", str(out))
        assert again.returncode == 2 and "--resume continues it" in last_error_line(again)
        result = run_cli("predict", str(bundle), str(folder), "--out", str(out), "--resume")
        assert result.returncode == 0, result.stderr[-2000:]
        resumed = 4 if suffix == ".parquet" else 3
        assert f"{resumed} images already in" in result.stdout
        rows = read_rows(out)
        paths = [str(Path(r["path"]).resolve()) for r in rows]
        assert len(rows) == expected and len(set(paths)) == expected, suffix
        assert all(r["label"] for r in rows if not r["error"])


NOT_UTF8 = os.fsdecode(b"caf\xe9-\xff.png")  # bytes a Linux file name may hold; Python keeps them as surrogates


def test_resume_keys_on_resolved_paths_and_survives_non_utf8_names(bundle, digits_three, tmp_path):
    """Resumed from another directory, through a linked folder and a relative spelling: nothing classified twice;
    a file name that is not UTF-8 is classified, written as \\xNN escapes (valid UTF-8) and skipped on resume."""
    folder, images = make_inputs(digits_three, tmp_path / "in", per_class=2)
    shutil.copy(images[0], folder / "0" / NOT_UTF8)
    (tmp_path / "link").symlink_to(folder, target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    expected = len(images) + 2  # the corrupt file's row and the non-UTF-8 copy's
    for suffix in (".csv", ".jsonl", ".parquet"):
        out = tmp_path / f"rows{suffix}"
        first = run_cli("predict", str(bundle), "in", "--out", out.name, "--backend", "onnx", cwd=tmp_path)
        assert first.returncode == 0, first.stderr[-2000:]
        rows = read_rows(out)
        assert len(rows) == expected and all(Path(r["path"]).is_absolute() for r in rows), suffix
        odd = [r for r in rows if "caf" in r["path"]]
        assert [Path(r["path"]).name for r in odd] == ["caf\\xe9-\\xff.png"] and odd[0]["label"], odd
        if suffix != ".parquet":
            out.read_bytes().decode("utf-8")  # strict: the whole file is valid UTF-8 (Parquet: its strings are)
        # Another directory, the folder through a link (CSV: a relative spelling with "." and ".." instead).
        spelled = "../in/./0/.." if suffix == ".csv" else str(tmp_path / "link")
        again = run_cli("predict", str(bundle), spelled, "--out", str(out), "--resume", "--backend", "onnx",
                        cwd=tmp_path / "elsewhere")
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"{expected} images already in" in again.stdout and "classified          0 images" in again.stdout
        assert read_rows(out) == rows, suffix


def test_retry_failed_classifies_unreadable_files_again(bundle, digits_three, tmp_path):
    """A file missing at the first run (a transient read error) is classified by --resume --retry-failed and its
    row replaced; a corrupt file (not an image: not transient) keeps its row; plain --resume retries nothing."""
    images = sorted((digits_three / "7").iterdir())[:3]
    (tmp_path / "corrupt.png").write_bytes(images[0].read_bytes()[:60])
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in images) + "late.png\ncorrupt.png\n")
    # The retried file must get the bundle's own answer for it (not "7": whether the tiny run is right about one
    # image depends on the processor it trained on).
    from transferkit import load_bundle

    expected_label = load_bundle(bundle, backend="onnx").predict([images[1]])[0]["label"]
    for suffix in (".csv", ".parquet"):
        out = tmp_path / f"rows{suffix}"
        out.unlink(missing_ok=True)
        (tmp_path / "late.png").unlink(missing_ok=True)
        assert run_cli("predict", str(bundle), str(listing), "--out", str(out), "--backend", "onnx").returncode == 0
        errors = {Path(r["path"]).name: r["error"] for r in read_rows(out) if r["error"]}
        assert errors["late.png"] == "no such file" and "corrupt or truncated" in errors["corrupt.png"]
        shutil.copy(images[1], tmp_path / "late.png")
        plain = run_cli("predict", str(bundle), str(listing), "--out", str(out), "--resume", "--backend", "onnx")
        assert plain.returncode == 0 and "5 images already in" in plain.stdout, plain.stderr[-2000:]
        retry = run_cli("predict", str(bundle), str(listing), "--out", str(out), "--resume", "--retry-failed",
                        "--backend", "onnx")
        assert retry.returncode == 0, retry.stderr[-2000:]
        assert "4 images already in" in retry.stdout and "1 unreadable before were tried again" in retry.stdout
        rows = read_rows(out)
        assert sorted(Path(r["path"]).name for r in rows) == sorted([p.name for p in images] + ["late.png",
                                                                                                "corrupt.png"])
        late = next(r for r in rows if r["path"].endswith("late.png"))
        assert late["error"] is None and late["label"] == expected_label, suffix
        assert next(r for r in rows if r["path"].endswith("corrupt.png"))["error"]


def test_parquet_rows_survive_sigkill_and_resume_reads_them(bundle, digits_three, tmp_path):
    """Each batch is a fsynced part in FILE.parts/ as soon as it is classified: SIGTERM merges them into FILE before
    the process ends; SIGKILL loses at most the batches in flight, and --resume skips every row the parts hold and
    merges everything into one file, each image once."""
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    sources = sorted((digits_three / "1").iterdir())
    for index in range(400):  # enough batches of one that the run is still going when it is killed
        (folder / str(index % 4)).mkdir(parents=True, exist_ok=True)
        shutil.copy(sources[index % len(sources)], folder / str(index % 4) / f"{index:04d}.png")
    out, parts = tmp_path / "rows.parquet", tmp_path / "rows.parquet.parts"

    def start_and_stop(signal: int) -> tuple[int, str]:
        command = [sys.executable, "-m", "transferkit", "predict", str(bundle), str(folder), "--out", str(out),
                   "--batch-size", "1", "--workers", "1", "--backend", "onnx"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while len(list(parts.glob("part-*.parquet"))) < 5:
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it was stopped"
            time.sleep(0.01)
        process.send_signal(signal)
        _, errors = process.communicate(timeout=120)
        return process.returncode, errors

    # SIGTERM: the batches so far are merged into the file before the process ends.
    code, errors = start_and_stop(15)
    assert code == 143 and "stopped by SIGTERM after" in errors and "holds the rows so far" in errors, errors[-2000:]
    assert 5 <= pq.read_table(out).num_rows < 400 and not parts.exists()
    out.unlink()
    assert start_and_stop(9)[0] == -9
    assert not out.exists()  # killed: nothing merged, the parts hold every finished batch
    kept = pq.read_table(parts).num_rows  # the folder reads as one dataset (temporary names start with a dot)
    assert 5 <= kept < 400
    again = run_cli("predict", str(bundle), str(folder), "--out", str(out), "--backend", "onnx")
    assert again.returncode == 2 and "--resume continues it" in last_error_line(again)
    result = run_cli("predict", str(bundle), str(folder), "--out", str(out), "--resume", "--batch-size", "64",
                     "--backend", "onnx")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{kept} images already in" in result.stdout
    rows = read_rows(out)
    assert len(rows) == 400 and len({r["path"] for r in rows}) == 400
    assert all(r["label"] for r in rows) and not parts.exists()
    assert pq.ParquetFile(out).num_row_groups == 1  # merged into full row groups, not one per batch of one


def test_parquet_merge_duplicates_nothing_after_a_crash_between_its_steps(tmp_path):
    """The merged file records the last part it holds: parts left by a crash after the merge's rename (before they
    were deleted) are not read twice, by --resume or by the next merge."""
    from transferkit.core.outputs import done_rows, open_writer, parts_dir

    out = tmp_path / "rows.parquet"

    def rows(*names: str) -> list[dict]:
        return [{"path": str(tmp_path / name), "label": "a", "score": 1.0, "top_k": [{"label": "a", "score": 1.0}],
                 "error": None} for name in names]

    writer = open_writer(out, append=False)
    writer.write(rows("a.png", "b.png"))
    writer.write(rows("c.png"))
    shutil.copytree(parts_dir(out), tmp_path / "saved")
    writer.close()
    assert out.exists() and not parts_dir(out).exists()
    shutil.copytree(tmp_path / "saved", parts_dir(out))  # the crash: the file replaced, its parts still there
    assert len(done_rows(out, lambda error: False).keys) == 3
    writer = open_writer(out, append=True)
    writer.write(rows("d.png"))
    writer.close()
    assert [Path(r["path"]).name for r in read_rows(out)] == ["a.png", "b.png", "c.png", "d.png"]


def test_escaped_names_read_back_as_the_files_they_name(tmp_path):
    """An output's ``\\xNN`` text names the file again (--resume, and an output used as a later run's list); a real
    name that holds a backslash sequence stays itself."""
    from transferkit.core.inputs import expand_inputs
    from transferkit.core.outputs import display_path, stored_path

    odd = tmp_path / NOT_UTF8
    odd.write_bytes(b"x")
    text = display_path(str(odd))
    assert text.endswith("caf\\xe9-\\xff.png") and text.encode("utf-8")
    assert stored_path(text) == str(odd)
    (tmp_path / "list.txt").write_text(text + "\n")
    assert [item.path for item in expand_inputs([tmp_path / "list.txt"])] == [str(odd)]
    literal = tmp_path / "lit\\x41.png"
    literal.write_bytes(b"y")
    assert stored_path(str(literal)) == str(literal) and display_path(str(literal)) == str(literal)


def test_evaluate_reproduces_the_runs_test_accuracy(bundle, trained_run, tmp_path):
    from transferkit.training.rundir import split_files

    files = split_files(trained_run.run_dir, "test")
    assert all(path.parent.name == label for path, label in files)
    listing = tmp_path / "test-split.txt"
    listing.write_text("".join(f"{path}\n" for path, _ in files))
    out = tmp_path / "scored.csv"
    # onnxruntime fp32 reproduces Keras' answers; a bf16 backend that `auto` may pick changes near-ties.
    result = run_cli("predict", str(bundle), str(listing), "--out", str(out), "--evaluate", "--backend", "onnx")
    assert result.returncode == 0, result.stderr[-2000:]
    report = tmp_path / "scored-evaluation"
    metrics = json.loads((report / "metrics.json").read_text())
    recorded = trained_run.metrics["test"]
    assert metrics["samples"] == recorded["samples"] == len(files)
    assert metrics["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-9)
    assert metrics["macro_f1"] == pytest.approx(recorded["macro_f1"], abs=1e-9)
    assert set(metrics["per_class"]) == {"0", "1", "7"}
    assert {"precision", "recall", "f1", "support"} <= set(metrics["per_class"]["7"])
    assert (report / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 7 |" in (report / "metrics.md").read_text()
    assert re.search(rf"\n  accuracy +{recorded['accuracy']:.4f} on {len(files)} labelled images", result.stdout)
    assert "run's test accuracy" in result.stdout
    rows = read_rows(out)
    assert [r["true_label"] for r in rows] == [label for _, label in files]


def test_facade_takes_paths_arrays_and_pil_images(bundle, digits_three):
    # `import transferkit` stays light: the facade loads numpy/onnxruntime on first use only.
    probe = ("import sys, transferkit; assert 'onnxruntime' not in sys.modules and 'tensorflow' not in sys.modules;"
             " from transferkit import load_bundle; print(load_bundle.__module__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "transferkit.core.classifier", result.stderr

    from PIL import Image

    from transferkit import load_bundle
    from transferkit.core.images import decode_image

    classifier = load_bundle("digits-test")  # a BentoML tag works where a directory does
    assert classifier.class_names == ["0", "1", "7"] and classifier.image_size == 32
    path = sorted((digits_three / "7").iterdir())[0]
    from_path = classifier.predict(path, top_k=3)
    assert set(from_path) == {"label", "score", "top_k"} and len(from_path["top_k"]) == 3
    answers = classifier.predict([str(path), Image.open(path), decode_image(path, 32), path.read_bytes()])
    for answer in answers:
        assert answer["label"] == from_path["label"]
        assert abs(answer["score"] - from_path["score"]) < 1e-6
    larger = np.asarray(Image.open(path).convert("RGB").resize((64, 48)))  # resized like a decoded file
    assert classifier.predict(larger)["label"] in classifier.class_names
    batch = np.stack([decode_image(p, 32) for p in sorted((digits_three / "1").iterdir())[:4]])
    assert [a["label"] for a in classifier.predict(batch)] == [a["label"] for a in classifier.predict(list(batch))]
    with pytest.raises(InvalidImageError, match="missing.png: no such file"):
        classifier.predict(path.parent / "missing.png")
    with pytest.raises(UsageError, match="cannot classify a dict"):
        classifier.predict({"not": "an image"})


def test_bad_arguments_are_one_line_before_work(bundle, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    cases = [
        (["--resume"], "--resume continues an output file"),
        (["--address", "127.0.0.1:6379"], "add --engine ray"),
        (["--out", str(tmp_path / "rows.xlsx")], "use .csv, .jsonl or .parquet"),
        (["--out", str(tmp_path / "r.csv"), "--resume", "--evaluate"], "without --resume"),
        (["--out", str(tmp_path / "r.csv"), "--retry-failed"], "add --resume"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ]
    for extra, expected in cases:
        result = run_cli("predict", str(bundle), str(image), *extra)
        assert result.returncode == 2, (extra, result.stderr)
        assert expected in last_error_line(result), (extra, result.stderr)
        assert "Traceback" not in result.stderr
    result = run_cli("predict", str(bundle), str(tmp_path / "*.jpg"))
    assert result.returncode == 2 and "no file matches" in last_error_line(result)


def test_local_engine_keeps_a_bounded_window(bundle, digits_three):
    """Memory does not grow with the number of files: the engine pulls paths only a few batches ahead."""
    from transferkit.core.batch import local_outcomes
    from transferkit.core.classifier import load_bundle
    from transferkit.core.inputs import Item

    files = sorted((digits_three / "1").iterdir())
    pulled = []

    def endless():  # a million-file archive, as far as the engine can tell
        for index in range(1_000_000):
            pulled.append(index)
            yield Item(str(files[index % len(files)]), True)

    classifier = load_bundle(bundle)
    stream = local_outcomes(endless(), classifier.predictor(threads=1), 32, batch_size=4, workers=2)
    batches = [next(stream) for _ in range(3)]
    stream.close()
    assert [len(b) for b in batches] == [4, 4, 4] and all(o.probabilities is not None for o in batches[0])
    assert len(pulled) <= (2 * 2 + 3) * 4 + 1  # the window (2 x workers batches) plus those handed out


def test_predict_out_fails_when_nothing_could_be_classified(bundle, tmp_path):
    """Every input unreadable: the rows with their errors are written, and the exit code says it failed."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (tmp_path / "in" / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 20)
    out = tmp_path / "rows.csv"
    result = run_cli("predict", str(bundle), str(tmp_path / "in" / "a.png"), str(tmp_path / "in" / "b.jpg"),
                     "--out", str(out), "--backend", "onnx")
    assert result.returncode == 2, result.stderr
    assert last_error_line(result).startswith("transferkit predict: error: none of the 2 inputs could be classified")
    rows = read_rows(out)
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.jpg"] and all(r["error"] for r in rows)


def test_predict_fails_when_no_file_found_is_an_image(bundle, tmp_path):
    """A folder of non-images with image names: each is skipped, so nothing is classified, with --out or not."""
    (tmp_path / "in").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "in" / name).write_text("not an image\n")
    out = tmp_path / "rows.csv"
    for extra in (["--out", str(out)], []):
        result = run_cli("predict", str(bundle), str(tmp_path / "in"), "--backend", "onnx", *extra)
        assert result.returncode == 2, result.stderr[-2000:]
        assert last_error_line(result).startswith("transferkit predict: error: none of the 2 files found is an image")
    assert read_rows(out) == []


def test_progress_writes_a_line_per_interval_off_a_terminal():
    import io

    from transferkit.core.progress import Progress

    stream = io.StringIO()
    progress = Progress(6, stream=stream, interval=0)
    for errors, skipped in ((0, 0), (1, 0), (0, 1)):
        progress.update(2, errors, skipped)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 4  # the start, then one per update
    assert lines[-1].startswith("100%|") and " 6/6 images " in lines[-1]
    assert re.search(r"\d images/s, 1 unreadable, 1 non-images skipped\]$", lines[-1]), lines[-1]
    assert (progress.done, progress.errors, progress.skipped) == (6, 1, 1) and progress.rate > 0

    stream = io.StringIO()
    progress = Progress(6, stream=stream, interval=3600)
    for _ in range(3):
        progress.update(2)
    progress.close()
    assert [line.split("|")[0] for line in stream.getvalue().splitlines()] == ["  0%", "100%"]  # start and end

    stream = io.StringIO()
    progress = Progress(6, stream=stream, interval=0, enabled=False)
    progress.update(6, 1)
    progress.close()
    assert stream.getvalue() == "" and (progress.done, progress.errors) == (6, 1)


def read_terminal(rows: int, columns: int, draw) -> tuple[bool, str]:
    """Run ``draw(stream)`` on a pseudo-terminal of that size; whether Progress took it for a terminal, and what
    it showed (the terminal turns each newline into CR LF)."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    with os.fdopen(secondary, "w") as stream:
        tty = draw(stream)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return tty, b"".join(chunks).decode().replace("\r\n", "\n")


def test_progress_redraws_in_place_on_a_terminal():
    from transferkit.core.progress import Progress

    def draw(stream) -> bool:
        progress = Progress(4, stream=stream, interval=0)
        progress.update(2, errors=1)
        progress.write("a line of its own")
        progress.update(2)
        progress.close()
        return progress.tty

    tty, shown = read_terminal(24, 100, draw)
    assert tty and shown.count("\n") == 2  # the line written, and the end of the bar's line
    drawn = shown.split("\r")
    assert drawn[-1].startswith("100%|") and re.search(r" 4/4 images .* images/s, 1 unreadable\]\n$", drawn[-1])
    assert any(state.startswith(" 50%|") for state in drawn) and "a line of its own\n" in drawn
    # A pseudo-terminal without a size (`script`, `docker run -t`): tqdm would draw nothing there, so lines it is.
    tty, shown = read_terminal(0, 0, draw)
    assert not tty and "\r" not in shown and shown.splitlines()[-1].startswith("100%|")
