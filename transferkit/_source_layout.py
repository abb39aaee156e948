"""Map the repository's stage folders into the ``transferkit`` namespace where no installer did.

``pip install`` (editable or not) maps ``training/`` to ``transferkit.training`` and so on. A bento's ``src/``
directory (``bentoml build`` copies files by path) and a bare checkout on ``sys.path`` have the folders but not the
mapping. There, and only there, a finder resolves exactly the four stage names to the sibling folders; an installed
distribution has no sibling stage folders, so nothing is registered and nothing else can be shadowed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

STAGES = ("training", "export", "service", "benchmarks")


class _StageFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 - importlib protocol
        prefix, _, stage = fullname.partition(".")
        init = self.root / stage / "__init__.py"
        if prefix != "transferkit" or stage not in STAGES or not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def install_source_layout() -> None:
    """Register the finder when stage folders sit beside the package and no installer mapped them.

    A bento copies only the stage the service needs (service/), so each stage is mapped if its folder is
    there; a stage that is absent stays unimportable, as it would be in an install without it."""
    root = Path(__file__).resolve().parent.parent
    if not any((root / stage / "__init__.py").is_file() for stage in STAGES):
        return
    if any(isinstance(finder, _StageFinder) for finder in sys.meta_path):
        return
    try:
        if importlib.util.find_spec("transferkit.service") is not None:
            return  # an installer's finder (editable or wheel) already provides it
    except (ImportError, ValueError):
        pass
    sys.meta_path.append(_StageFinder(root))
