"""Imports flow one way (core <- training <- export <- service / benchmarks) and the core stays TF-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder in the repository -> the namespace it is installed as.
STAGES = {
    "transferkit/core": "transferkit.core",
    "training": "transferkit.training",
    "export": "transferkit.export",
    "service": "transferkit.service",
    "benchmarks": "transferkit.benchmarks",
}
# What each stage may import from the project; `transferkit` itself (its __version__) is open to all. The command line
# and the demo (transferkit.cli, transferkit.demo) sit above every stage, so no stage imports them.
ALLOWED = {
    "transferkit.core": {"transferkit.core"},
    "transferkit.training": {"transferkit.core", "transferkit.training"},
    "transferkit.export": {"transferkit.core", "transferkit.training", "transferkit.export"},
    # The service runs bundles with the runtime in core; it never needs the writer (export) or TensorFlow.
    "transferkit.service": {"transferkit.core", "transferkit.service"},
    "transferkit.benchmarks": {"transferkit.core", "transferkit.training", "transferkit.export",
                               "transferkit.service", "transferkit.benchmarks"},
}
LEGACY_TOP_LEVELS = {"training", "export", "service", "benchmarks"}


def project_imports(path: Path) -> set[str]:
    """The project namespaces a file imports, as 'transferkit.<part>' (or the bare legacy top-level name)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
            if node.module == "transferkit":  # from transferkit import core / cli / ...
                modules = [f"transferkit.{alias.name}" for alias in node.names]
        for module in modules:
            parts = module.split(".")
            if parts[0] == "transferkit":
                names.add(".".join(parts[:2]))
            elif parts[0] in LEGACY_TOP_LEVELS:
                names.add(parts[0])
    return names


@pytest.mark.parametrize("folder", sorted(STAGES))
def test_imports_flow_one_way(folder):
    stage = STAGES[folder]
    files = list((REPO / folder).rglob("*.py"))
    assert files
    for path in files:
        forbidden = project_imports(path) - ALLOWED[stage] - {"transferkit"}
        assert not forbidden, f"{path.relative_to(REPO)} imports {forbidden}"


def test_checker_sees_forbidden_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import service.http\nfrom transferkit import cli\nfrom transferkit.demo import main\n")
    assert project_imports(sample) == {"service", "transferkit.cli", "transferkit.demo"}


def test_core_does_not_import_tensorflow_or_keras():
    """Every module of the runtime (core), the service and the command line imports without TensorFlow, Keras or the
    writer's converters (the base install has none of them: tests/test_packaging.py)."""
    modules = sorted(f"transferkit.core.{p.stem}" for p in (REPO / "transferkit" / "core").glob("*.py")
                     if p.stem != "__init__")
    modules += sorted(f"transferkit.service.{p.stem}" for p in (REPO / "service").glob("*.py")
                 if p.stem != "__init__")
    code = (f"import importlib, sys, transferkit.cli; [importlib.import_module(m) for m in {modules!r}]; "
            "transferkit.cli.build_parser(); "
            "bad = {'tensorflow', 'keras', 'tf2onnx', 'onnx', 'sklearn'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_distribution_installs_only_the_transferkit_namespace(tmp_path):
    """Build the wheel from a copy of the repository and read its top-level names: `transferkit` and nothing
    generic beside it (no `training`, `export`, `service` or `benchmarks` to collide with other distributions)."""
    import shutil
    import zipfile

    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                                 "runs", "bundles", "transferkit-demo", "data"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("transferkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_levels == {"transferkit"}
    for stage in ("training/train.py", "export/bundle.py", "service/service.py", "benchmarks/sweep.py",
                  "core/backbones.py"):
        assert f"transferkit/{stage}" in names


def test_stages_import_from_the_namespace_in_a_plain_checkout(tmp_path):
    """A bento's src/ or a checkout that was never installed maps the stage folders into the namespace too."""
    code = ("import sys, transferkit.training, transferkit.service; "
            "print(transferkit.training.__file__); assert 'training' not in sys.modules")
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(REPO / "training" / "__init__.py")


def test_every_third_party_import_is_declared():
    """Each package the code imports by name is in pyproject's dependencies or an extra, not only pulled in by
    another package (which may drop it)."""
    import re
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {re.split(r"[\[<>=;!~ ]", r)[0].lower().replace("_", "-") for r in requirements}
    imported = set()
    for folder in ("transferkit", *(f for f in STAGES if f != "transferkit/core")):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "transferkit"} - LEGACY_TOP_LEVELS
    distributions = packages_distributions()
    undeclared = {m: distributions.get(m) for m in third_party
                  if not {d.lower().replace("_", "-") for d in distributions.get(m, [])} & declared}
    assert len(third_party) > 20 and not undeclared, undeclared
