"""Which models a service serves: one bundle, a model repository folder, or several of either, each under a name.

``TRANSFERKIT_MODEL`` (and ``transferkit serve MODEL``) holds one or more comma-separated references:

- a **bundle directory** (it holds ``manifest.json``): one model, named by the manifest;
- a **model repository**, a folder of models in Triton's layout: one sub-folder per model name, holding either one
  bundle (``REPO/NAME/manifest.json``) or versions of it (``REPO/NAME/VERSION/manifest.json``, the newest version
  served: version folders in natural order, numbers numerically, as Triton's integer versions and transferkit's
  ``YYYYMMDD-HHMMSS-...`` versions both sort; folders whose name starts with a dot are skipped, so a version can be
  copied in under ``.NAME`` and renamed when complete); the folder's name is the model's name;
- a **BentoML model tag** (``digits:latest``): one model, named by the tag's name (the service resolves it).

Names become URL path segments and metric label values, so they are checked here: letters, digits, ``_ . -``, at
most 64 characters, each at most once. Nothing here imports BentoML or TensorFlow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from transferkit.core.errors import TransferkitError, UsageError
from transferkit.core.manifest import MANIFEST_NAME

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ModelSource:
    """One model a service serves: a bundle directory (``path``) or a model-store tag (``tag``), under ``name``."""

    name: str
    path: Path | None = None
    tag: str | None = None
    versions: tuple[str, ...] = field(default=())  # a repository model's version folders, oldest first
    repository: Path | None = None  # the repository folder it was found in (polled for new versions)

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path) if self.path else None, "tag": self.tag,
                "versions": list(self.versions), "repository": str(self.repository) if self.repository else None}

    @classmethod
    def from_dict(cls, value: dict) -> ModelSource:
        return cls(value["name"], path=Path(value["path"]) if value.get("path") else None, tag=value.get("tag"),
                   versions=tuple(value.get("versions") or ()),
                   repository=Path(value["repository"]) if value.get("repository") else None)

    @property
    def where(self) -> Path | str:
        """What to load: the bundle folder, or the store tag."""
        return self.path if self.path is not None else str(self.tag)


def _natural(text: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


def is_bundle(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def check_name(name: str, where: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"{where}: model name {name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with "
                         "a letter or digit (it becomes a URL path segment)")
    return name


def repository_model(folder: Path) -> ModelSource | None:
    """The model a repository sub-folder holds (its newest version), or None when it holds no bundle."""
    name = check_name(folder.name, f"model repository {folder.parent}")
    if is_bundle(folder):
        return ModelSource(name, path=folder, repository=folder.parent)
    versions = sorted((child.name for child in folder.iterdir()
                       if child.is_dir() and not child.name.startswith(".") and is_bundle(child)), key=_natural)
    if not versions:
        return None
    return ModelSource(name, path=folder / versions[-1], versions=tuple(versions), repository=folder.parent)


def read_repository(folder: Path) -> list[ModelSource]:
    """Every model of a repository folder, by name; a folder without any bundle is refused."""
    children = sorted((child for child in folder.iterdir() if child.is_dir() and not child.name.startswith(".")),
                      key=lambda child: child.name)
    models = [model for model in map(repository_model, children) if model is not None]
    if not models:
        raise UsageError(f"{folder} is neither a transferkit bundle ({MANIFEST_NAME}) nor a model repository "
                         "(sub-folders NAME/ or NAME/VERSION/ holding bundles)")
    return models


def _source(reference: str) -> list[ModelSource]:
    from transferkit.core.manifest import read_manifest

    path = Path(reference).expanduser()
    if path.is_dir():
        if is_bundle(path):
            try:
                name = read_manifest(path).name
            except TransferkitError:  # the service stays unready with the reason; the folder names the model
                name = path.name
            return [ModelSource(check_name(name, str(path)), path=path)]
        return read_repository(path)
    if "/" in reference or reference.startswith("."):
        raise UsageError(f"{reference}: no such bundle directory or model repository")
    return [ModelSource(check_name(reference.split(":", 1)[0], "model tag"), tag=reference)]


def absolute_setting(setting: str) -> str:
    """The setting with every directory made absolute (a server process may start elsewhere); tags unchanged."""
    references = [reference.strip() for reference in str(setting).split(",")]
    return ",".join(str(Path(r).expanduser().resolve()) if r and Path(r).expanduser().is_dir() else r
                    for r in references)


def model_sources(setting: str) -> list[ModelSource]:
    """The models ``TRANSFERKIT_MODEL`` names (see the module docstring), in the order given; a name given twice
    is refused."""
    sources = [source for reference in setting.split(",") if reference.strip()
               for source in _source(reference.strip())]
    if not sources:
        raise UsageError("no model given: name a BentoML model tag, a bundle directory or a model repository")
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise UsageError(f"two models are named {source.name!r}: each model needs its own name")
        seen.add(source.name)
    return sources


def default_model(sources: list[ModelSource], configured: str | None) -> str | None:
    """The model ``/predict`` answers for when a request names none: the configured one, else the only one."""
    names = [source.name for source in sources]
    if configured is not None:
        if configured not in names:
            raise UsageError(f"default model {configured!r} is not served; the models are: {', '.join(names)}")
        return configured
    return names[0] if len(names) == 1 else None
