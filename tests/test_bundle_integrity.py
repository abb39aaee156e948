"""What a loader runs is what the manifest covers (issue #25, item 7): entries stay inside the bundle, no links, no
unlisted files, no ONNX external data, and the bytes an engine loads are the bytes that were hashed.

Every case tampers with a copy of the session's real bundle (or a small real ONNX bundle) and asks both
``transferkit.load_bundle`` and the ``transferkit predict`` command line, which must refuse it with a reason: a
BundleError, and exit 2 with one line.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

import transferkit
from conftest import last_error_line, run_cli
from transferkit.core.errors import BundleError
from transferkit.core.manifest import FormatEntry, Manifest, read_manifest, sha256_path
from transferkit.core.onnx_scan import external_tensors
from transferkit.core.predictors import load_bundle


def _edit_manifest(bundle: Path, **files: str) -> None:
    """Point format entries at other files (format name -> file), leaving everything else as exported."""
    path = bundle / "manifest.json"
    raw = json.loads(path.read_text())
    for name, file in files.items():
        raw["formats"][name]["file"] = file
    path.write_text(json.dumps(raw, indent=2))


def _outside_copy(bundle: Path, name: str, tmp_path: Path) -> Path:
    """The same bytes as ``bundle/name``, outside the bundle: a link to it would pass any checksum."""
    target = tmp_path / "outside" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if (bundle / name).is_dir() else shutil.copy2)(bundle / name, target)
    return target


def _link_file(copy: Path, tmp_path: Path) -> None:
    target = _outside_copy(copy, "model.onnx", tmp_path)
    (copy / "model.onnx").unlink()
    (copy / "model.onnx").symlink_to(target)


def _link_directory(copy: Path, tmp_path: Path) -> None:
    target = _outside_copy(copy, "saved_model/variables", tmp_path)
    shutil.rmtree(copy / "saved_model" / "variables")
    (copy / "saved_model" / "variables").symlink_to(target, target_is_directory=True)


def _link_inside_saved_model(copy: Path, tmp_path: Path) -> None:
    (copy / "saved_model" / "notes.txt").symlink_to(copy / "manifest.json")


def _link_extra_directory(copy: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (copy / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)


def _flip_a_byte(copy: Path, tmp_path: Path) -> None:
    path = copy / "model.fp16.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


TAMPERING: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "entry with ..": (lambda copy, tmp: _edit_manifest(copy, onnx="../x"), "formats['onnx'].file = '../x' steps out"),
    "entry inside via ..": (lambda copy, tmp: _edit_manifest(copy, onnx="saved_model/../model.onnx"), "steps out"),
    "absolute entry": (lambda copy, tmp: _edit_manifest(copy, onnx=str(copy / "model.onnx")), "is an absolute path"),
    "windows absolute entry": (lambda copy, tmp: _edit_manifest(copy, onnx="C:\\model.onnx"), "is an absolute path"),
    # A link leading out of the bundle is refused as the manifest is read; one inside it by the walk.
    "linked file": (_link_file, "'model.onnx' resolves outside the bundle directory (through a symbolic link)"),
    "link to a file inside": (lambda copy, tmp: (copy / "alias.onnx").symlink_to("model.onnx"),
                              "'alias.onnx' is a symbolic link"),
    "linked directory": (_link_directory, "'saved_model/variables' is a symbolic link"),
    "link inside saved_model": (_link_inside_saved_model, "'saved_model/notes.txt' is a symbolic link"),
    "linked extra directory": (_link_extra_directory, "'more' is a symbolic link"),
    "unlisted file": (lambda copy, tmp: (copy / "weights.bin").write_bytes(b"\0" * 64),
                      "'weights.bin' is not listed in manifest.json"),
    # Under a listed directory, a new file changes the directory's checksum.
    "unlisted file in saved_model": (lambda copy, tmp: (copy / "saved_model" / "assets" / "x.txt").write_text("x"),
                                     "saved_model does not match its manifest checksum"),
    "altered file": (_flip_a_byte, "model.fp16.onnx does not match its manifest checksum"),
}


@pytest.fixture
def copy(bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session's exported bundle, to tamper with."""
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target, symlinks=True)
    return target


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_bundles_are_refused_with_a_reason(copy, tmp_path, case):
    tamper, reason = TAMPERING[case]
    tamper(copy, tmp_path)
    with pytest.raises(BundleError) as refused:
        transferkit.load_bundle(copy, backend="onnx", device="cpu")
    assert reason in str(refused.value) and "\n" not in str(refused.value)
    result = run_cli("predict", str(copy), str(copy / "manifest.json"), "--backend", "onnx", "--device", "cpu")
    assert result.returncode == 2, result.stderr[-2000:]
    assert reason in last_error_line(result) and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [last_error_line(result)]


def test_entries_are_checked_when_the_manifest_is_read(copy, tmp_path):
    """Before anything is opened: read_manifest itself refuses, also an entry that leaves through a link."""
    _edit_manifest(copy, onnx="../../etc/passwd")
    with pytest.raises(BundleError, match=r"formats\['onnx'\]\.file = '\.\./\.\./etc/passwd' steps out"):
        read_manifest(copy)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy2(copy / "model.onnx", tmp_path / "elsewhere" / "model.onnx")
    (copy / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _edit_manifest(copy, onnx="sub/model.onnx")
    with pytest.raises(BundleError, match="resolves outside the bundle directory"):
        read_manifest(copy)


def test_a_linked_manifest_and_special_files_are_refused(copy, tmp_path):
    shutil.copy2(copy / "manifest.json", tmp_path / "manifest.json")
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(copy)
    (copy / "manifest.json").unlink()
    shutil.copy2(tmp_path / "manifest.json", copy / "manifest.json")
    os.mkfifo(copy / "pipe")  # a reader of a FIFO would hang: it is refused without being read
    with pytest.raises(BundleError, match="'pipe' is not a regular file"):
        load_bundle(copy)


def test_the_bundle_directory_itself_may_be_a_link(copy, tmp_path):
    """``bundles/latest -> bundles/v3`` is a normal layout: only what is inside the bundle must not be a link."""
    (tmp_path / "latest").symlink_to(copy, target_is_directory=True)
    assert load_bundle(tmp_path / "latest").manifest.name == "digits-test"


def test_the_loader_hashes_the_bytes_it_loads(copy):
    """A check at load_bundle is not reused later: each predictor hashes the bytes it hands the engine, so a file
    changed after load_bundle is refused when a predictor is made, and an intact one runs from those bytes."""
    loaded = load_bundle(copy)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    before = loaded.predictor("onnx", device="cpu")(images)
    _flip_a_byte(copy, Path())
    with pytest.raises(BundleError, match="model.fp16.onnx does not match its manifest checksum"):
        loaded.predictor("onnx-fp16", device="cpu")
    assert np.array_equal(loaded.predictor("onnx", device="cpu")(images), before)


def test_the_directory_digest_is_unchanged_for_exported_bundles(bundle):
    """The checksum walk now refuses links instead of skipping them; on a real SavedModel it is the same digest."""
    entry = read_manifest(bundle).formats["savedmodel"]
    assert sha256_path(bundle / entry.file) == (entry.sha256, entry.bytes, entry.files)


# ONNX external data, on a small real model written by the onnx package.

SIZE = 2


def _onnx_model(weights: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
             helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(weights, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _tiny_bundle(out: Path, external: str | None = None) -> Path:
    """A bundle with one ONNX format; with ``external``, its weights are saved in that side file."""
    import onnx

    out.mkdir(parents=True)
    weights = np.linspace(-1, 1, SIZE * SIZE * 3 * 2, dtype=np.float32).reshape(-1, 2) / 100
    model = _onnx_model(weights)
    if external:
        onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, location=external,
                        size_threshold=0)
    else:
        onnx.save_model(model, str(out / "model.onnx"))
    digest, size, count = sha256_path(out / "model.onnx")
    manifest = Manifest(
        name="tiny", version="1", created=datetime.now(UTC), backbone="none", family="none", image_size=SIZE,
        class_names=["a", "b"], preprocessing={"mode": "none", "in_graph": "none"}, input={"name": "image"},
        output={"name": "probabilities"},
        formats={"onnx": FormatEntry(file="model.onnx", sha256=digest, bytes=size, files=count, input_name="image",
                                     output_name="probabilities", input_dtype="uint8", precision="fp32", opset=17)},
        training={}, validation=None, versions={},
    )
    (out / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    return out


def test_a_self_contained_onnx_bundle_runs_from_its_bytes(tmp_path):
    bundle = load_bundle(_tiny_bundle(tmp_path / "tiny"))
    probabilities = bundle.predictor("onnx", device="cpu")(np.zeros((3, SIZE, SIZE, 3), np.uint8))
    assert probabilities.shape == (3, 2) and np.allclose(probabilities, 0.5)


def test_onnx_external_data_is_refused(tmp_path, monkeypatch):
    """A side file in the bundle is an unlisted file; a side file elsewhere (onnxruntime would look for it in the
    current directory when the model comes from bytes) is refused from the ONNX file itself."""
    beside = _tiny_bundle(tmp_path / "beside", external="weights.bin")
    with pytest.raises(BundleError, match="'weights.bin' is not listed in manifest.json"):
        load_bundle(beside)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(beside, elsewhere)
    monkeypatch.chdir(tmp_path)
    (elsewhere / "weights.bin").rename(tmp_path / "weights.bin")  # where onnxruntime would find it from bytes
    with pytest.raises(BundleError, match=r"model.onnx keeps 1 tensor\(s\) in side files \(tensor 'W' in "
                                          r"'weights.bin'\)"):
        load_bundle(elsewhere)
    result = run_cli("predict", str(elsewhere), str(elsewhere / "manifest.json"), "--backend", "onnx", cwd=tmp_path)
    assert result.returncode == 2 and "in side files" in last_error_line(result)


def test_the_external_data_scan_agrees_with_onnx(tmp_path):
    """The runtime's protobuf reader (no onnx package) finds what onnx's own helper finds, in subgraphs too."""
    import onnx
    from onnx import TensorProto, external_data_helper, helper, numpy_helper

    constant = numpy_helper.from_array(np.ones(64, np.float32), "branch_constant")
    branch = helper.make_graph([helper.make_node("Constant", [], ["y"], value=constant)], "then", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])])
    other = helper.make_graph([helper.make_node("Constant", [], ["z"], value=numpy_helper.from_array(
        np.zeros(64, np.float32), "other_constant"))], "else", [], [helper.make_tensor_value_info("z", 1, [64])])
    graph = helper.make_graph(
        [helper.make_node("If", ["condition"], ["out"], then_branch=branch, else_branch=other)], "g",
        [helper.make_tensor_value_info("condition", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [64])],
        initializer=[numpy_helper.from_array(np.ones((8, 8), np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert external_tensors(model.SerializeToString()) == []
    external_data_helper.convert_model_to_external_data(model, location="side.bin", size_threshold=0,
                                                        convert_attribute=True)
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    saved = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph
    branches = [attribute.g.node[0].attribute[0].t for attribute in saved.node[0].attribute]
    assert all(external_data_helper.uses_external_data(t) for t in [saved.initializer[0], *branches])
    found = external_tensors((tmp_path / "m.onnx").read_bytes())
    assert {name for name, _ in found} == {t.name for t in [saved.initializer[0], *branches]} \
        == {"W", "branch_constant", "other_constant"}
    assert {location for _, location in found} == {"side.bin"}
    for broken in (b"\xff", b"\x3a\x05ab", b"\x0b"):  # a truncated varint, a short field, a group
        with pytest.raises(ValueError):
            external_tensors(broken)
