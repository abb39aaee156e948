"""JSON as the service accepts it from a client: RFC 8259's interoperable subset (I-JSON, RFC 7493), refused with a
400 otherwise, and never deep enough to exhaust a stack.

Python's ``json.loads`` accepts more than that, and each extra reached a 500 or a wrong answer here (issue 25):
``NaN``/``Infinity``/``-Infinity`` tokens and overflowing numbers (``1e999`` is ``inf``), which the response encoder
then refuses; unpaired UTF-16 surrogates (``"\\ud800"``, or the raw UTF-8 of one, which ``json.loads(bytes)`` lets
through), which cannot be encoded back to UTF-8; nesting a thousand levels deep (a RecursionError in the parser or
in whoever walks the result); duplicate keys, of which it silently keeps the last; UTF-16 and UTF-32 bodies.

:func:`loads` refuses all of these as :class:`~transferkit.core.errors.ServiceError` 400 ``bad_request``. The
extra checks cost little next to the parse itself: the depth is measured on the raw bytes (strings skipped, then a
running sum of brackets in numpy) only when there are more brackets than the limit, and strings are walked for
surrogates only when the text holds a surrogate escape.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from transferkit.core.errors import ServiceError

MAX_DEPTH = 32  # arrays and objects; an inference request needs 7 (a UINT8 [N,S,S,3] tensor's data included)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included ("unrolled": no backtracking)
_NOT_BRACKET = bytes(range(256)).translate(None, b"[]{}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_OPENING = (ord("["), ord("{"))


def _bad(message: str) -> ServiceError:
    return ServiceError(400, "bad_request", message)


def depth(text: bytes) -> int:
    """How deeply the arrays and objects of JSON ``text`` nest, measured without parsing it."""
    brackets = np.frombuffer(_STRING.sub(b'""', text).translate(None, _NOT_BRACKET), np.uint8)
    if not len(brackets):
        return 0
    steps = np.where(np.isin(brackets, _OPENING), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def _refuse_constant(name: str) -> float:
    raise _bad(f"{name} is not a JSON number: numbers must be finite")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _bad(f"the number {text[:40]} is out of range: numbers must be finite")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # rare: find which key, for the message
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _bad(f"duplicate key {ascii(key)[:60]} in a JSON object: which one counts is ambiguous")
            seen.add(key)
    return obj


def _strings(value: Any):
    """Every string in a parsed JSON value, object keys included."""
    pending = [value]
    while pending:
        node = pending.pop()
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            pending.extend(node.keys())
            pending.extend(node.values())


def _refuse_lone_surrogates(value: Any) -> None:
    for string in _strings(value):
        if not string.isascii():
            try:
                string.encode("utf-8")
            except UnicodeEncodeError:
                raise _bad("a JSON string holds an unpaired UTF-16 surrogate (e.g. \\ud800): not valid Unicode") \
                    from None


def loads(text: bytes, what: str = "the request") -> Any:
    """Parse ``text`` (UTF-8 JSON); a 400 ``bad_request`` naming ``what`` for anything outside I-JSON."""
    try:
        decoded = text.decode("utf-8")  # strict: a raw surrogate or a UTF-16 body is refused here
    except UnicodeDecodeError as exc:
        raise _bad(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    if text.count(b"[") + text.count(b"{") > MAX_DEPTH and depth(text) > MAX_DEPTH:
        raise _bad(f"{what} nests arrays and objects more than {MAX_DEPTH} deep")
    try:
        value = json.loads(decoded, parse_constant=_refuse_constant, parse_float=_finite, object_pairs_hook=_unique)
    except ValueError as exc:  # JSONDecodeError, an integer over Python's digit limit
        raise _bad(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:  # not reachable past the depth check; never a 500 if it were
        raise _bad(f"{what} nests arrays and objects too deeply") from None
    if b"\\u" in text and _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(value)
    return value
