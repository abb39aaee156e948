"""Model control: the Open Inference Protocol's model-repository extension, as Triton serves it.

- ``POST /v2/repository/index``: every model of the service and of its repositories, with its version, state
  (``READY``, ``LOADING``, ``UNAVAILABLE``) and, when a load failed or it was unloaded, the reason;
- ``POST /v2/repository/models/NAME/load``: (re)load NAME's newest version in every worker (service/reload.py: verified,
  loaded and warmed beside the serving version, then swapped in; on failure the old version keeps serving, 409
  ``load_failed`` says why); a repository folder added after the start can be loaded by its name;
- ``POST /v2/repository/models/NAME/unload``: stop serving NAME (503 ``model_unloaded`` until loaded again).

Off (403 ``control_off``) unless ``TRANSFERKIT_ADMIN_TOKEN`` (or ``_FILE``) is set; then every request must carry
``Authorization: Bearer <admin token>`` (else 401), whatever ``TRANSFERKIT_API_TOKEN`` is. A request reaches one
worker; it writes the request into the server's control folder, every worker applies it (in the ``batched`` layout,
every process of that model's service), and the answer comes once each has written its outcome (or the request
timeout passes: 504).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from transferkit.core.errors import ServiceError
from transferkit.core.repository import NAME_PATTERN, ModelSource, repository_model
from transferkit.service.errors import error_response
from transferkit.service.reload import read_json, write_json
from transferkit.service.spares import assign, assignments

PREFIX = "/v2/repository"
NAME_PARAMETER = "model_name"  # not the protocol routes' {name}: the route guard checks those against served models
STATES = {"ready": "READY", "loading": "LOADING"}


class RepositoryControl:
    """The routes above, for the service ``get_service`` returns; ``workers``: how many must apply a request."""

    def __init__(self, get_service: Callable[[], Any], token: bytes | None, control_dir: Path | None, workers: int,
                 timeout_s: float, off_reason: str | None = None, fixed_models: bool = False, spares: int = 0):
        self.get_service, self.token, self.control_dir = get_service, token, control_dir
        self.workers, self.timeout_s = workers, timeout_s
        # The batched layout starts a model service per model it serves: a model added later can be loaded only
        # into one of its spare model services (service/spares.py).
        self.fixed_models, self.spares = fixed_models, spares
        self.off_reason = off_reason or ("model control is off: set TRANSFERKIT_ADMIN_TOKEN (or "
                                         "TRANSFERKIT_ADMIN_TOKEN_FILE) to turn it on")

    def routes(self) -> list[Route]:
        return [Route(f"{PREFIX}/index", self.index, methods=["POST"]),
                Route(f"{PREFIX}/models/{{{NAME_PARAMETER}}}/load", self.load, methods=["POST"]),
                Route(f"{PREFIX}/models/{{{NAME_PARAMETER}}}/unload", self.unload, methods=["POST"])]

    def _authorize(self, request: Request) -> None:
        if self.token is None or self.control_dir is None:
            raise ServiceError(403, "control_off", self.off_reason)
        scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), self.token):
            raise ServiceError(401, "unauthorized", "model control needs the admin token: send "
                                                    "'Authorization: Bearer <admin token>'")

    async def index(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ServiceError as exc:
            return error_response(exc)
        return JSONResponse(await index_rows(self.get_service().models))

    async def load(self, request: Request) -> Response:
        return await self._control(request, "load")

    async def unload(self, request: Request) -> Response:
        return await self._control(request, "unload")

    async def _control(self, request: Request, action: str) -> Response:
        try:
            self._authorize(request)
            name = request.path_params[NAME_PARAMETER]
            models = self.get_service().models
            models.refresh()
            if action == "unload":  # what serves now, its folder removed since or not
                slot = models.slots.get(name)
                if slot is None or not NAME_PATTERN.fullmatch(name):
                    raise ServiceError(404, "unknown_model", f"model {ascii(name)[:70]} is not loaded")
                source = slot.source or loadable_source(models, name)
            else:
                source = loadable_source(models, name)
            spare = assignments(self.control_dir).get(name, (None,))[0]
            if self.fixed_models and name not in models.slots and spare is None:
                if not self.spares:
                    raise ServiceError(409, "load_failed", f"model {name!r} was not served at the start: the "
                                                            "batched layout runs a model service per model it "
                                                            "started with; restart the service to add one, or start "
                                                            "it with TRANSFERKIT_SPARE_MODELS")
                spare = assign(self.control_dir, name, source, self.spares)
            outcomes = await self._carry_out(name, action, source, spare)
        except ServiceError as exc:
            return error_response(exc)
        models.refresh()  # a model given a spare just now
        failed = [o for o in outcomes if not o["ok"]]
        if failed:
            loaded = sorted({o["version"] or "" for o in outcomes if o["ok"]})
            # Some workers may have loaded it: say so, as each serves what it has (the index shows which).
            stays = f"{len(outcomes) - len(failed)} of {len(outcomes)} workers serve version {', '.join(loaded)} " \
                    "now, the others what they served before" if loaded else "the version serving before stays"
            return error_response(ServiceError(409, "load_failed", f"model {name!r} was not loaded by every worker "
                                                                    f"({stays}): {failed[0]['reason']}"))
        return JSONResponse({"model": name, "action": action,
                             "versions": sorted({o["version"] or "" for o in outcomes}), "workers": len(outcomes)})

    async def _carry_out(self, name: str, action: str, source: ModelSource, spare: int | None) -> list[dict]:
        """Write the request for every worker (``spare``: the spare model service of a model loaded since the
        start), then wait for each one's outcome. The same request still being carried out (a retry after a 504)
        is waited for again, not written anew: every worker would load the version once more."""
        path = self.control_dir / "requests" / f"{name}.json"
        asked = {"model": name, "action": action, "source": source.as_dict(), "spare": spare}
        pending = read_json(path) or {}
        if {key: pending.get(key) for key in asked} == asked and len(self._outcomes(name, pending["serial"])) < \
                self.workers:
            serial = pending["serial"]
        else:
            # Later than any request before, whatever the clock did (a worker applies a request newer than its last).
            serial = max(time.time_ns(), pending.get("serial", 0) + 1)
            write_json(path, {"serial": serial, **asked})
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            outcomes = self._outcomes(name, serial)
            if len(outcomes) >= self.workers:
                return outcomes
            await asyncio.sleep(0.1)
        raise ServiceError(504, "control_timeout", f"not every worker finished the {action} of {name!r} within "
                                                   f"{self.timeout_s:.0f} s; POST {PREFIX}/index shows where each is")

    def _outcomes(self, name: str, serial: int) -> list[dict]:
        """The workers' outcomes of request ``serial`` for ``name`` so far."""
        return [o for o in map(read_json, (self.control_dir / "status").glob(f"{name}.*.json"))
                if o and o.get("serial") == serial]


def loadable_source(models: Any, name: str) -> ModelSource:
    """Where a load of ``name`` comes from: a repository model's newest version now, or what it was served from; a
    name found in none of the service's repositories is 404."""
    if not NAME_PATTERN.fullmatch(name):
        raise ServiceError(404, "unknown_model", f"no model {ascii(name)[:70]} in this service's repositories")
    slot = models.slots.get(name)
    repositories = {slot.source.repository for slot in models.slots.values()
                    if slot.source is not None and slot.source.repository is not None}
    if slot is not None and slot.source is not None and slot.source.repository is None:
        return slot.source  # a lone bundle or a store tag: load it again
    for repository in sorted(repositories):
        folder = repository / name
        if folder.is_dir():
            found = repository_model(folder)
            if found is not None:
                return found
    raise ServiceError(404, "unknown_model", f"no model {ascii(name)[:70]} in this service's repositories")


async def index_rows(models: Any) -> list[dict]:
    """Triton's repository index: name, version, state, reason."""
    rows = []
    models.refresh()
    for name, slot in list(models.slots.items()):  # a load may add a slot while this awaits
        entry = slot.current
        if entry is None:
            state, version = "UNAVAILABLE", None
            reason = slot.reason or "unloaded"
        else:
            described = await entry.describe() if entry.manifest is not None else {"state": "failed"}
            state = STATES.get(described.get("state"), "UNAVAILABLE")
            version = entry.manifest.version if entry.manifest is not None else None
            reason = slot.reason or entry.load_error or described.get("reason") or described.get("error") or ""
        rows.append({"name": name, "version": version, "state": state, **({"reason": reason} if reason else {})})
    return rows


