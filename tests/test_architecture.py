"""Imports flow one way (core <- training <- export <- service / benchmarks) and the core stays TF-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["transferkit/core", "training", "export", "service", "benchmarks"]
# What each package may import from the project.
ALLOWED = {
    "transferkit/core": {"transferkit"},
    "training": {"transferkit", "training"},
    "export": {"transferkit", "training", "export"},
    "service": {"transferkit", "export", "service"},
    "benchmarks": {"transferkit", "training", "export", "service", "benchmarks"},
}
PROJECT = {"transferkit", "training", "export", "service", "benchmarks"}


def imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", STAGES)
def test_imports_flow_one_way(package):
    for path in (REPO / package).rglob("*.py"):
        project_imports = imported_top_levels(path) & PROJECT
        forbidden = project_imports - ALLOWED[package]
        assert not forbidden, f"{path.relative_to(REPO)} imports {forbidden}"


def test_core_does_not_import_tensorflow_or_keras():
    code = ("import sys, transferkit.core.backbones, transferkit.core.images, transferkit.core.atomic, "
            "transferkit.cli; transferkit.cli.build_parser(); "
            "bad = {'tensorflow', 'keras'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
