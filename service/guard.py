"""The outermost layer of the entry service: which requests reach BentoML at all.

BentoML's first middleware labels its request metrics with the request's path (``endpoint``), before any route is
matched: 200 random paths added 4,000 series to ``/metrics`` (20 per path), and ``/v2/models/{name}`` did the same
for every name a client invented. So :class:`RouteGuard` wraps the whole BentoML app (service/connections.py puts it
there) and answers, before anything is labelled or a body is read:

- 404 ``not_found`` for a path no route serves, and for a ``/v2/models/{name}`` whose name or version is not the
  served model's (the check is the route's own, so the answer is too); every path that passes is one of a fixed set;
- 405 ``method_not_allowed`` for a method the route does not take (a POST to ``/livez`` or ``/metrics`` is refused
  without reading its body);
- 431 ``headers_too_large`` for a request line and headers over the cap (uvicorn's h11 limits only heads that
  arrive in pieces: a complete 100 KB head in one packet was accepted);
- 401 ``unauthorized`` when a bearer token is configured and the request does not carry it (probes stay open;
  ``/metrics`` too unless ``protect_metrics``; the model-control routes check the admin token themselves).

A refusal closes the connection when the request declared a body, which is then never read.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from transferkit.core.errors import ServiceError
from transferkit.service.errors import error_response

Scope = dict[str, Any]
ParamsCheck = Callable[[dict[str, str]], None]  # raises ServiceError for values the server does not serve
# Answered to anyone, token or not: an orchestrator's probes carry no credentials.
PROBES = frozenset({"/livez", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
METRICS = "/metrics"
# The reasons this layer refuses with: transferkit_rejected_inputs_total labels, created at start (http.py).
REASONS = ("not_found", "method_not_allowed", "unauthorized", "headers_too_large")
SHOWN_PATH_CHARS = 80


@dataclass(frozen=True)
class Template:
    """A route with path parameters (``/v2/models/{name}/infer``): served only for values ``check`` accepts."""

    regex: re.Pattern
    methods: frozenset[str]


@dataclass
class Routes:
    """Every path the app serves and the methods each takes: exact paths, and templates for the others."""

    exact: dict[str, frozenset[str]]
    templates: list[Template]


def _methods(route: Any) -> frozenset[str]:
    return frozenset(route.methods or ("GET", "HEAD"))


def _static_paths(prefix: str, static_files: Any) -> dict[str, frozenset[str]]:
    """The files a StaticFiles mount can answer, as exact paths (its directories are fixed when it is built)."""
    paths: dict[str, frozenset[str]] = {}
    for directory in getattr(static_files, "all_directories", []) or []:
        for root, _, files in os.walk(directory):
            for name in files:
                relative = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
                paths[f"{prefix}/{relative}"] = frozenset({"GET", "HEAD"})
    return paths


def collect_routes(routes: Iterable[Any], prefix: str = "") -> Routes:
    """Walk a Starlette app's routes (mounted apps included) into :class:`Routes`. A mount that is neither a Starlette
    app nor static files cannot be enumerated: its paths stay unknown (404), which keeps the label set fixed."""
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    found = Routes({}, [])
    for route in routes:
        if isinstance(route, Route):
            if route.param_convertors:
                regex = re.compile("^" + re.escape(prefix) + route.path_regex.pattern.lstrip("^"))
                found.templates.append(Template(regex, _methods(route)))
            else:
                found.exact[prefix + route.path] = _methods(route)
        elif isinstance(route, Mount) and isinstance(route.app, StaticFiles):
            found.exact.update(_static_paths(prefix + route.path, route.app))
        elif isinstance(route, Mount) and getattr(route.app, "routes", None) is not None:
            inner = collect_routes(route.app.routes, prefix + route.path)
            found.exact.update(inner.exact)
            found.templates.extend(inner.templates)
    return found


def head_bytes(scope: Scope) -> int:
    """The size of the request line and headers as received (give or take the separators)."""
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 16
    for name, value in scope.get("headers") or ():
        size += len(name) + len(value) + 4
    return size


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers") or ():
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


def _bearer(scope: Scope) -> bytes | None:
    """The credentials of an ``Authorization: Bearer ...`` header (the scheme is case-insensitive), else None."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            return credentials.strip() if scheme.lower() == b"bearer" else None
    return None


class RouteGuard:
    """Refuse, before the wrapped app sees it, every request outside the app's fixed set of routes (see the module
    docstring). ``check_params`` validates a template's values (the model name and version);
    ``token``: the bearer token every route but the probes (and ``/metrics`` unless ``protect_metrics``) requires;
    ``on_reject``: called with each refusal's reason (a fixed set: a metric label)."""

    def __init__(self, app: Any, routes: Routes, *, check_params: ParamsCheck, max_head_bytes: int,
                 token: bytes | None = None, protect_metrics: bool = False,
                 on_reject: Callable[[str], None] | None = None, own_credentials: str | None = None):
        self.app, self.routes, self.check_params = app, routes, check_params
        self.max_head_bytes, self.token = max_head_bytes, token
        self.own_credentials = own_credentials  # routes that check a token of their own (the admin token)
        self.open_paths = PROBES if protect_metrics else PROBES | {METRICS}
        self.on_reject = on_reject or (lambda reason: None)
        self._checked: dict[str, frozenset[str]] = {}  # template paths whose values passed: a few, all valid

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] == "websocket":  # no route takes one; uvicorn would pass it to BentoML's metrics
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._admit(scope)
        except ServiceError as refusal:
            if refusal.reason in REASONS:  # not the model check's 404/503: the routes do not count those either
                self.on_reject(refusal.reason)
            await self._refuse(scope, receive, send, refusal)
            return
        await self.app(scope, receive, send)

    def _admit(self, scope: Scope) -> None:
        """Raise the refusal for a request outside the fixed set; return for one the app serves."""
        if head_bytes(scope) > self.max_head_bytes:
            raise ServiceError(431, "headers_too_large", f"request line and headers over "
                                                         f"{self.max_head_bytes // 1024} KiB")
        path, method = scope["path"], scope["method"]
        methods = self.routes.exact.get(path) or self._checked.get(path) or self._template_methods(path)
        if method not in methods and method != "OPTIONS":  # OPTIONS: CORS preflight, BentoML's to answer
            raise ServiceError(405, "method_not_allowed", f"{method[:10]} {self._shown(path)}: method not allowed "
                                                          f"(allowed: {', '.join(sorted(methods))})")
        # OPTIONS: a CORS preflight never carries credentials, and a route answers it with nothing but headers.
        if self.token is not None and path not in self.open_paths and method != "OPTIONS" \
                and not (self.own_credentials and path.startswith(self.own_credentials)):
            self._authorize(scope)

    def _template_methods(self, path: str) -> frozenset[str]:
        for template in self.routes.templates:
            match = template.regex.match(path)
            if match:
                self.check_params(match.groupdict())  # 404 (another model) or 503 (none loaded): the route's answer
                if len(self._checked) < 64:  # a fixed set in practice; bounded regardless
                    self._checked[path] = template.methods
                return template.methods
        raise ServiceError(404, "not_found", f"{self._shown(path)}: no such route")

    def _authorize(self, scope: Scope) -> None:
        presented = _bearer(scope)
        # compare_digest: the time taken does not depend on how much of the token matched.
        if presented is None or not hmac.compare_digest(presented, self.token):
            error = "missing" if presented is None else "wrong"
            raise ServiceError(401, "unauthorized", f"a bearer token is required ({error}): send "
                                                    f"'Authorization: Bearer <token>'")

    @staticmethod
    def _shown(path: str) -> str:
        return path if len(path) <= SHOWN_PATH_CHARS else path[:SHOWN_PATH_CHARS] + "..."

    async def _refuse(self, scope: Scope, receive, send, refusal: ServiceError) -> None:
        # The body stays unread, so the connection cannot carry another request; nor should an oversized head's.
        headers = {"Connection": "close"} if _has_body(scope) or refusal.status == 431 else {}
        if refusal.status == 401:
            invalid = ', error="invalid_token"' if _bearer(scope) is not None else ""
            headers["WWW-Authenticate"] = f'Bearer realm="transferkit"{invalid}'
        elif refusal.status == 405:
            allowed = self.routes.exact.get(scope["path"]) or self._checked.get(scope["path"]) or ()
            headers["Allow"] = ", ".join(sorted(allowed))
        await error_response(refusal, headers)(scope, receive, send)
