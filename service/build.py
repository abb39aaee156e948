"""``transferkit build``: a bento of the service and its models, from an installed transferkit or a checkout.

``bentoml build`` copies files by path, so the repository's bentofile.yaml only works in a checkout. This writes an
equivalent build context in a temporary directory instead: the packages a bento runs (``transferkit``'s own
``__init__``, the runtime in ``transferkit.core`` and ``transferkit.service``, copied from wherever they are
imported from), a bentofile, and the pinned requirements of the chosen target: the CPU onnxruntime wheel by default,
``onnxruntime-gpu[cuda,cudnn]`` with ``--gpu``, OpenVINO added with ``--openvino``. Training and export never go in.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from transferkit.core.errors import TransferkitError, UsageError

# Only these go into a bento: the service imports nothing else from transferkit (tests/test_architecture.py).
PACKAGES = {"transferkit": ("__init__.py", "_source_layout.py", "py.typed"), "transferkit.core": None,
            "transferkit.service": None}
COPIED_SUFFIXES = (".py", ".tsv", ".typed")
# The OpenVINO the tests run (pyproject's `openvino` extra allows the 2026 releases).
OPENVINO_REQUIREMENT = "openvino==2026.4.1"


@dataclass
class BuiltBento:
    tag: str
    target: str
    requirements: list[str]
    models: list[str]  # the exact store tags packed


def requirements(gpu: bool, openvino: bool) -> list[str]:
    """The pinned requirement lines of a bento for the target (service/requirements-{cpu,gpu}.txt)."""
    name = "requirements-gpu.txt" if gpu else "requirements-cpu.txt"
    text = (Path(__file__).resolve().parent / name).read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line] + ([OPENVINO_REQUIREMENT] if openvino else [])


def bentofile(openvino: bool, models: str | None = None) -> dict:
    """The same service, includes and Docker base as the repository's bentofile.yaml; ``models``: the exact tags a
    bento of several models serves (one model needs none: the service serves the only one in the store)."""
    return {
        "service": "transferkit.service.service:ImageClassifier",
        "name": "transferkit",
        "labels": {"project": "transferkit"},
        "include": ["transferkit/**/*.py", "transferkit/**/*.tsv", "transferkit/py.typed"],
        "exclude": ["**/__pycache__/"],
        "python": {"requirements_txt": "requirements.txt", "lock_packages": False},
        "docker": {"distro": "debian", "python_version": "3.11"},
        # `auto` measures the backends OpenVINO adds; without it onnx is the only candidate on CPU.
        "envs": [{"name": "TRANSFERKIT_BACKEND", "value": "auto" if openvino else "onnx"},
                 {"name": "BENTOML_DO_NOT_TRACK", "value": "true"},
                 *([{"name": "TRANSFERKIT_MODEL", "value": models}] if models else [])],
    }


def write_context(context: Path, gpu: bool, openvino: bool, models: str | None = None) -> list[str]:
    """Copy the packages a bento runs and write its bentofile and requirements into ``context``."""
    for package, names in PACKAGES.items():
        source = Path(importlib.import_module(package).__file__).resolve().parent
        target = context.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir()):
            if path.is_file() and path.suffix in COPIED_SUFFIXES and (names is None or path.name in names):
                shutil.copy2(path, target / path.name)
    pinned = requirements(gpu, openvino)
    (context / "requirements.txt").write_text("\n".join(pinned) + "\n")
    (context / "bentofile.yaml").write_text(yaml.safe_dump(bentofile(openvino, models), sort_keys=False))
    return pinned


def store_tags(model: str) -> list[str]:
    """``model``'s comma-separated references as the exact ``NAME:VERSION`` store tags a bento packs and pins: a
    tag as the store resolves it now; a bundle folder, or each model of a model repository (its newest version),
    registered under its name after its files are verified (or the same bundle found there already)."""
    import bentoml

    from transferkit.core.repository import model_sources
    from transferkit.core.store import stored_tag

    tags = []
    for source in model_sources(model):  # names checked, each at most once
        if source.path is not None:
            tags.append(stored_tag(source.path, source.name))
            continue
        try:
            tags.append(str(bentoml.models.get(source.tag).tag))
        except Exception as exc:  # bentoml's NotFound, a malformed tag
            raise UsageError(f"{source.tag}: not in the BentoML model store ({type(exc).__name__}: {exc}); see "
                             "`bentoml models list`, or give a bundle folder or a model repository") from None
    return tags


def build_bento(model: str, gpu: bool = False, openvino: bool = False) -> BuiltBento:
    """``bentoml build`` of the service with ``model`` packed (model-store tags, bundle folders or model
    repositories, comma-separated; see :func:`store_tags`); the new bento's tag. A bento of several models pins
    their exact tags in its ``TRANSFERKIT_MODEL``; one of one model serves the only model it holds."""
    tags = store_tags(model)
    model = ",".join(tags)
    with tempfile.TemporaryDirectory(prefix="transferkit-bento-") as tmp:
        pinned = write_context(Path(tmp), gpu, openvino, model if len(tags) > 1 else None)
        env = {**os.environ, "TRANSFERKIT_MODEL": model, "BENTOML_DO_NOT_TRACK": "true"}
        # BentoML reads the bentofile only from inside the working directory.
        result = subprocess.run([sys.executable, "-m", "bentoml", "build", ".", "--output", "tag"],
                                capture_output=True, text=True, env=env, cwd=tmp)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise TransferkitError(f"bentoml build failed: {last}")
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    return BuiltBento(tag=tag, target="gpu" if gpu else "cpu", requirements=pinned, models=tags)
