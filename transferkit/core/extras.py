"""Which optional extra provides which import, so that a command whose extra is missing ends with one line naming it.

The base install is the bundle runtime (``predict``, ``serve``, ``build``, ``bench --bundles``, ``load_bundle``);
everything else comes with an extra declared in pyproject.toml. A command that needs an extra whole is checked before
it starts (:func:`require_command_extra`); elsewhere :func:`missing_extra` turns the ``ModuleNotFoundError`` of a
lazy import into a :class:`MissingExtraError` (exit 2) wherever it surfaces (``bench`` in sweep mode, ``predict
--evaluate``, the savedmodel backend).
"""

from __future__ import annotations

import importlib.util

from transferkit.core.errors import UsageError

# extra -> the top-level modules it installs that transferkit imports (pyproject.toml's optional-dependencies).
# `train` includes `evaluate` (listed first, so that scikit-learn alone names the smaller extra).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "evaluate": ("sklearn", "scipy"),
    "train": ("tensorflow", "keras", "tf2onnx", "onnx", "onnxconverter_common", "sklearn"),
    "loadtest": ("locust", "gevent", "fastapi"),
    "ray": ("ray", "pyarrow"),
    "openvino": ("openvino",),
}
# Commands that need an extra whole: its name wins over the module's (the digits come through scikit-learn, yet
# `transferkit data` is part of training).
COMMAND_EXTRAS = {"data": "train", "train": "train", "export": "train", "demo": "train", "loadtest": "loadtest"}


class MissingExtraError(UsageError):
    """A command needs an optional extra that is not installed."""

    @classmethod
    def of(cls, what: str, extra: str, module: str) -> MissingExtraError:
        return cls(f"{what} needs the '{extra}' extra ({module} is not installed): {install_hint(extra)}")


def install_hint(extra: str) -> str:
    return f'pip install "transferkit[{extra}]" (in a checkout: pip install -e ".[{extra}]")'


def extra_of_module(name: str) -> str | None:
    top = name.split(".")[0]
    return next((extra for extra, modules in EXTRA_MODULES.items() if top in modules), None)


def missing_extra(exc: ModuleNotFoundError, command: str | None = None) -> MissingExtraError | None:
    """The one-line error for a missing optional module, or None for a module no extra provides (a real bug)."""
    extra = extra_of_module(exc.name or "")
    if extra is None:
        return None
    extra = COMMAND_EXTRAS.get(command or "", extra)
    return MissingExtraError.of(f"transferkit {command}" if command else "this", extra, exc.name or "")


def require_command_extra(command: str) -> None:
    """Raise :class:`MissingExtraError` before ``command`` starts if it needs an extra that is not installed."""
    extra = COMMAND_EXTRAS.get(command)
    absent = [name for name in EXTRA_MODULES.get(extra, ()) if importlib.util.find_spec(name) is None]
    if extra and absent:
        raise MissingExtraError.of(f"transferkit {command}", extra, absent[0])


def require_module(module: str, what: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra that installs ``module`` when it is absent (``what`` is the
    option or feature that needs it, e.g. ``--backend savedmodel``)."""
    extra = extra_of_module(module)
    if extra and importlib.util.find_spec(module) is None:
        raise MissingExtraError.of(what, extra, module)
