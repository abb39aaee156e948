"""The models one service serves, by name, and the one answering requests that name none.

Routes choose a model per request: ``?model=NAME`` on ``/predict``, ``/explain`` and ``/metadata``, the path on
``/v2/models/NAME``. A name the service does not serve is 404 ``unknown_model`` listing the names; a request that
names none where several models are served and no default is configured is 400 ``model_required``, listing them too.
Only configured names are ever looked up or shown, so a client cannot make the service remember a new string.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from starlette.requests import Request

from transferkit.core.errors import ModelUnavailable, ServiceError

MODEL_PARAMETER = "model"
E = TypeVar("E")


def _listed(names: list[str]) -> str:
    return ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def _shown(name: str) -> str:
    return ascii(name) if len(name) <= 70 else ascii(name[:67]) + "..."


class ModelSet(Generic[E]):
    """Name -> the routes' view of that model (service/http.py's ``Entry``), and the default name (or None)."""

    def __init__(self, models: dict[str, E], default: str | None, unavailable: str | None = None):
        self.models, self.default, self.unavailable = models, default, unavailable

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def __iter__(self) -> Iterator[tuple[str, E]]:
        return iter(self.models.items())

    def select(self, name: str | None) -> E:
        """The model ``name`` names, or the default one for None; a :class:`ServiceError` (404 or 400) otherwise,
        503 ``model_unavailable`` with the reason when the service has no model at all (a wrong setting)."""
        if not self.models:
            raise ModelUnavailable("model_unavailable", f"no model is served: {self.unavailable or 'see the log'}")
        if name is None:
            if self.default is None:
                raise ServiceError(400, "model_required", f"this service serves {len(self.models)} models and none "
                                                          f"is the default: name one with ?{MODEL_PARAMETER}=NAME "
                                                          f"(or /v2/models/NAME): {_listed(self.names)}")
            name = self.default
        found = self.models.get(name)
        if found is None:
            raise ServiceError(404, "unknown_model", f"no model {_shown(name)} is served here; the models are: "
                                                     f"{_listed(self.names)}")
        return found


def requested_model(request: Request) -> str | None:
    """The ``model`` query parameter (at most once), or None."""
    values = request.query_params.getlist(MODEL_PARAMETER)
    if len(values) > 1:
        raise ServiceError(400, "bad_model", f"'{MODEL_PARAMETER}' given {len(values)} times; give it once")
    return values[0] if values else None


def select(service: Any, request: Request) -> Any:
    """The model a ``/predict``, ``/explain`` or ``/metadata`` request is for (see the module docstring)."""
    return service.models.select(requested_model(request))
