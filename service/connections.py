"""Connection hygiene for the entry workers' uvicorn: a deadline for request heads, a cap on their size, and the
route guard (service/guard.py) around the whole BentoML app.

What BentoML 1.4.40 runs (``_bentoml_impl/worker/service.py``): ``uvicorn.Config(app, backlog, timeout_keep_alive=5,
...)`` with uvicorn's defaults otherwise: ``http="auto"`` (h11 here; httptools where installed), no limit on how long
a request head may take, and h11's 16 KiB cap on a head that arrives in pieces only. Measured before this module: a
connection that sent nothing, or half a request head, or one header byte every 2 s (slow-loris), was still open after
40 s (uvicorn arms its keep-alive timer only after a response, and any byte cancels it); a 100 KB head in one packet
was answered 200.

:func:`install` (called when the service module is imported in a worker) wraps ``uvicorn.Config.__init__`` so that
the entry service's config gets

- ``http``: uvicorn's own protocol class with :class:`HeadDeadline` mixed in: the request line and headers must be
  complete within ``head_timeout_s`` of their first byte (a new connection: of its opening), else 408 and the
  connection closes; a head growing past ``max_head_bytes`` is 431. The same deadline bounds what follows a response
  answered before its body arrived (BentoML's 504): that body's trickle cannot hold the connection. Once a head is
  complete, the request belongs to BentoML's request timeout (``TRANSFERKIT_TIMEOUT_S``), slow body included;
- ``h11_max_incomplete_event_size``: the same cap, h11's own check;
- ``timeout_keep_alive`` (and the idle part of the head timer): ``TRANSFERKIT_KEEP_ALIVE_S``, 75 s, instead of
  BentoML's 5 s. A client that waited out a Retry-After of 5 s, or a load balancer whose pool keeps connections up
  to its own idle timeout (60 s on AWS), sends on a connection the server is closing at that moment and gets no
  answer at all (one /predict of ~2,500 at 128 users, once Retry-After spread refused clients over 1-6 s);
- ``app``: the BentoML app inside the route guard, so that nothing reaches BentoML's metrics unchecked.

Both refusals are the service's error JSON, like every other 4xx, written straight to the socket: no request exists
yet for the ASGI app to answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}


def raw_error(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response with the service's JSON body, closing the connection."""
    body = json.dumps({"error": message, "reason": reason}).encode()
    return (f"HTTP/1.1 {status} {REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class HeadDeadline:
    """Mixed into uvicorn's ``H11Protocol`` or ``HttpToolsProtocol`` (both keep ``loop``, ``transport`` and the
    request's ``cycle``, and call ``on_response_complete`` and ``send_400_response``).

    While no request is being served, a timer runs: armed for ``head_timeout_s`` when the connection opens, for
    ``keep_alive_s`` when a response completes (the idle time a kept connection may wait for its next request),
    restarted for ``head_timeout_s`` at the next head's first byte, stopped when a request starts. When it fires the
    connection closes, after a 408 if part of a head had arrived."""

    head_timeout_s: float = 10.0
    keep_alive_s: float = 75.0
    max_head_bytes: int = 16 * 1024
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes: int = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head(self.head_timeout_s)

    def data_received(self, data: bytes) -> None:
        waiting = self._head_timer is not None
        if waiting:
            if self._head_bytes == 0:
                self._arm(self.head_timeout_s)  # the head's own time starts with its first byte
            self._head_bytes += len(data)
        super().data_received(data)
        if not waiting or self.transport.is_closing():
            return
        if self._serving():
            self._disarm()  # a request started: BentoML's request timeout covers it, body included
        elif self._head_bytes > self.max_head_bytes:
            self._refuse(431, "headers_too_large", f"request line and headers over {self.max_head_bytes // 1024} KiB")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._serving():  # a pipelined request may have started
            self._await_head(self.keep_alive_s)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a malformed head (h11: also one past ``h11_max_incomplete_event_size``), as JSON."""
        self._disarm()
        if self._head_bytes > self.max_head_bytes:
            self._refuse(431, "headers_too_large", f"request line and headers over {self.max_head_bytes // 1024} KiB")
        else:
            self._refuse(400, "bad_http", "malformed HTTP request")

    def _serving(self) -> bool:
        cycle = getattr(self, "cycle", None)
        return cycle is not None and not cycle.response_complete

    def _await_head(self, seconds: float) -> None:
        self._head_bytes = 0
        self._arm(seconds)

    def _arm(self, seconds: float) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(seconds, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._serving():
            return
        if self._head_bytes:
            self._refuse(408, "header_timeout", f"the request head did not arrive within {self.head_timeout_s:g} s")
        else:  # idle: nobody is waiting for an answer
            self.transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer and close; only close when the bytes were the unread body of a request already answered (a 504
        before its body arrived): that client is not waiting for a second answer."""
        self._disarm()
        if not getattr(getattr(self, "cycle", None), "more_body", False):
            self.transport.write(raw_error(status, reason, message))
        self.transport.close()


def guarded_protocol(base: type, head_timeout_s: float, max_head_bytes: int, keep_alive_s: float) -> type:
    """``base`` (one of uvicorn's HTTP protocol classes) with :class:`HeadDeadline` and these limits."""
    return type(f"Guarded{base.__name__}", (HeadDeadline, base),
                {"head_timeout_s": float(head_timeout_s), "max_head_bytes": int(max_head_bytes),
                 "keep_alive_s": float(keep_alive_s)})


def _protocol_class(http: Any) -> type | None:
    """uvicorn's class for its ``http`` setting; None for one this module does not know (left alone)."""
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    if isinstance(http, str) and http in ("auto", "h11", "httptools"):
        return import_from_string(HTTP_PROTOCOLS[http])
    return None


def install(head_timeout_s: float, max_head_bytes: int, wrap_app: Callable[[Any], Any],
            applies: Callable[[], bool], keep_alive_s: int) -> bool:
    """Patch ``uvicorn.Config`` so that every config built while ``applies()`` (the entry service's) gets the
    guarded protocol, the head cap, ``keep_alive_s`` and ``wrap_app(app)``; idempotent. False when uvicorn is not
    importable."""
    try:
        from uvicorn.config import Config
    except ImportError:
        return False
    original = Config.__init__
    if getattr(original, "_transferkit_guard", False):
        return True

    def __init__(self, app, *args, **kwargs) -> None:
        if applies():
            base = _protocol_class(kwargs.get("http", "auto"))
            if base is not None:
                kwargs["http"] = guarded_protocol(base, head_timeout_s, max_head_bytes, keep_alive_s)
            if kwargs.get("h11_max_incomplete_event_size") is None:
                kwargs["h11_max_incomplete_event_size"] = max_head_bytes
            kwargs["timeout_keep_alive"] = keep_alive_s
            app = wrap_app(app)
        original(self, app, *args, **kwargs)

    __init__._transferkit_guard = True  # type: ignore[attr-defined]
    Config.__init__ = __init__
    return True
