"""The one mapping from an exception to the service's error answer, for the routes, ``/v2`` and the middleware.

Every refusal is JSON ``{"error": "<one line for a person>", "reason": "<machine-readable>"}`` with the status the
error carries and ``Retry-After`` when retrying helps. What a client may see:

- :class:`~transferkit.core.errors.ServiceError` (every check of a request, the model's availability): as raised;
- another :class:`~transferkit.core.errors.TransferkitError` with a 4xx status (bad input): its status, reason and
  message, with server paths masked;
- a pydantic ``ValidationError`` (a request that does not fit a model): 400 ``bad_request`` naming the fields, never
  echoing the values;
- anything else, 5xx TransferkitErrors included (their messages describe the server): logged in full, answered 500
  ``model_error`` with a generic message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from pydantic import ValidationError
from starlette.responses import JSONResponse

from transferkit.core.errors import ServiceError, TransferkitError

logger = logging.getLogger("transferkit.service")
SERVER_FAULT_REASON = "model_error"
SERVER_FAULT_MESSAGE = "the model failed to answer; this is a server fault and has been logged"


def mask_paths(message: str) -> str:
    """A message fit for a client: absolute filesystem paths of the server replaced by ``<path>``."""
    return re.sub(r"(?<![\w.])/[^\s:'\"]+", "<path>", message)


def as_service_error(exc: BaseException) -> ServiceError:
    """The client-facing form of ``exc`` (see the module docstring); a server fault is logged here, once."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, TransferkitError) and 400 <= exc.http_status < 500:
        return ServiceError(exc.http_status, exc.reason, mask_paths(str(exc)))
    if isinstance(exc, ValidationError):
        fields = sorted({".".join(map(str, e["loc"])) or "body" for e in exc.errors()})
        return ServiceError(400, "bad_request", f"invalid request: {', '.join(fields[:5])} "
                                                f"({exc.error_count()} problem(s))")
    logger.error("transferkit: request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return ServiceError(500, SERVER_FAULT_REASON, SERVER_FAULT_MESSAGE)


def error_response(exc: BaseException, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The error answer for ``exc``: status, JSON body and headers (``Retry-After`` when the error says retrying
    helps, plus ``headers``). A Starlette response is an ASGI app too, so ASGI middleware sends it with
    ``await error_response(exc)(scope, receive, send)``."""
    error = as_service_error(exc)
    extra = {"Retry-After": str(error.retry_after)} if error.retry_after else {}
    return JSONResponse({"error": error.message, "reason": error.reason}, status_code=error.status,
                        headers={**extra, **(headers or {})} or None)
