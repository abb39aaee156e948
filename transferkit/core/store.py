"""BentoML's model store: registering a bundle, so that a service or a bento can name it by tag.

Only BentoML is imported (lazily), never TensorFlow: ``transferkit build`` registers a model repository's bundles
from the runtime install.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transferkit.core.errors import UsageError
from transferkit.core.manifest import Manifest, read_manifest, verify_bundle

STORE_LABEL = "transferkit-bundle"  # the ``stage`` label of every bundle transferkit registers


def register_bundle(bundle_dir: Path, manifest: Manifest, name: str | None = None) -> str:
    """Copy the bundle into the BentoML model store (``$BENTOML_HOME``) as ``NAME:VERSION`` (``name``, else the
    manifest's; the manifest's version); returns the tag."""
    import bentoml

    labels = {"backbone": manifest.backbone.lower(), "stage": STORE_LABEL}
    metadata = {
        "backbone": manifest.backbone, "image_size": manifest.image_size, "num_classes": manifest.num_classes,
        "formats": ",".join(manifest.formats), "validation_passed": bool(manifest.validation and
                                                                        manifest.validation.passed),
        "schema_version": manifest.schema_version,
    }
    with bentoml.models.create(f"{name or manifest.name}:{manifest.version}", labels=labels, metadata=metadata,
                               module="transferkit.bundle") as ref:
        shutil.copytree(bundle_dir, ref.path, dirs_exist_ok=True)
    return str(ref.tag)


def stored_tag(bundle_dir: Path, name: str) -> str:
    """The store tag of the bundle in ``bundle_dir`` under ``name``: registered now after its files are verified, or
    the entry already there when it holds the same files (same version, same checksums); a different bundle under
    the same tag is refused, never overwritten."""
    import bentoml

    manifest = read_manifest(bundle_dir)
    verify_bundle(bundle_dir, manifest)
    try:
        existing = bentoml.models.get(f"{name}:{manifest.version}")
    except bentoml.exceptions.NotFound:
        return register_bundle(bundle_dir, manifest, name)
    if read_manifest(Path(existing.path)).formats != manifest.formats:
        raise UsageError(f"{existing.tag} is already in the model store with other files than {bundle_dir.name}; "
                         "export the bundle again (a new version) or delete the entry with `bentoml models delete`")
    return str(existing.tag)
