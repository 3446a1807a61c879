"""Reading and decoding request bodies: content type, size and time limits, JSON, field-naming
validation errors.

Before msgspec decodes a body, one scan (`check_structure`) refuses what msgspec would take
silently or fail on: an object with the same key twice (msgspec keeps the last; 422 naming the
key) and nesting deeper than `MAX_JSON_DEPTH` (msgspec recurses and would raise RecursionError).
The common case is decided by bytes operations in C (split at the quotes; no string occurs twice,
few brackets); otherwise a regular expression that skips everything but keys and brackets walks
the body with one Python step per key and bracket, never per byte.
"""

from __future__ import annotations

import ast
import json
import re
from typing import TypeVar

import anyio
import msgspec
from starlette.types import Receive, Scope

from ...config import PATTERN_WORDS
from ...errors import InvalidInput, MalformedRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from ...service import split_validation
from .edge import RequestHeaders, request_headers

__all__ = ("MAX_JSON_DEPTH", "check_structure", "decode", "read_body", "require_json")

T = TypeVar("T")

MAX_JSON_DEPTH = 64
"""Objects and arrays nested deeper than this are refused (400 malformed_request)."""

_STRING = rb'"(?:[^"\\]++|\\.)*+"'
_TOKEN = re.compile(
    # skip (possessively, in C) everything that is neither a key nor a bracket: plain text and
    # string values (a string followed by ':' is a key)
    rb'(?:[^"{}\[\]]++|' + _STRING + rb"(?!\s*+:))*+"
    rb"(?:(?P<key>" + _STRING + rb")\s*+:|(?P<open>[{\[])|(?P<close>[}\]]))"
)
"""The next key or bracket after `pos`; no match at the end of the text (or where it is not JSON)."""
_LOCATE = re.compile(rb"(?P<key>" + _STRING + rb")\s*+:|" + _STRING + rb"|(?P<tok>[{}\[\],])")


def check_structure(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse duplicate keys in one object (422 naming it) and nesting deeper than `max_depth`
    (400). Text that is not JSON is left for the decoder to refuse."""
    if not _plainly_fine(body, max_depth):
        _scan(body, max_depth)


def _plainly_fine(body: bytes, max_depth: int) -> bool:
    """The fast path, in C but for one step per key: True when no key occurs twice in the whole
    body and it has at most `max_depth` brackets; False when `_scan` must look closer."""
    text = body
    escaped = b"\\" in text
    if escaped:  # drop escaped backslashes, then escaped quotes: the quotes left delimit strings
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    parts = text.split(b'"')  # strings at the odd indexes
    if not len(parts) & 1:
        return False  # an odd number of quotes: not JSON
    outside = b"".join(parts[0::2])
    if outside.count(b"{") + outside.count(b"[") > max_depth:
        return False
    strings = parts[1::2]
    if len(set(strings)) == len(strings) and not escaped:
        return True
    keys = [k for k, after in zip(strings, parts[2::2], strict=True) if after.lstrip()[:1] == b":"]
    return len(set(keys)) == len(keys) and not any(b"\\" in k for k in keys)


def _scan(body: bytes, max_depth: int) -> None:
    stack: list[set[bytes] | None] = []  # one entry per open bracket: an object's keys, or None (array)
    match = _TOKEN.match
    pos = 0
    while (m := match(body, pos)) is not None:
        pos = m.end()
        key = m["key"]
        if key is not None:
            keys = stack[-1] if stack else None
            if keys is None:
                continue  # not JSON (a key outside an object): the decoder says so
            if b"\\" in key:  # "\u0061" and "a" are one key
                key = _unescape(key)
            if key in keys:
                path = _path_at(body, m.start("key"))
                raise InvalidInput(f"duplicate key {_text(key)} in one object", field=path)
            keys.add(key)
        elif m["open"] is not None:
            stack.append(set() if m["open"] == b"{" else None)
            if len(stack) > max_depth:
                raise MalformedRequest(f"the JSON body is nested deeper than {max_depth} levels")
        elif stack:
            stack.pop()


def _unescape(key: bytes) -> bytes:
    try:
        return json.dumps(json.loads(key), ensure_ascii=False).encode("utf-8", "surrogatepass")
    except ValueError:
        return key  # not valid JSON: the decoder refuses it


def _text(key: bytes) -> str:
    return json.dumps(key[1:-1].decode("utf-8", "replace")) if key.startswith(b'"') else repr(key)


def _path_at(body: bytes, stop: int) -> str:
    """The JSON path ("$.a[2].b") of the key that starts at `stop` (only on errors: slow)."""
    frames: list[list[str | int | None]] = []  # per open bracket: [kind, current key or index]
    pos = 0
    while (m := _LOCATE.search(body, pos)) is not None:
        if m.start() >= stop:
            key = json.loads(m["key"]) if m["key"] is not None else "?"
            if frames and frames[-1][0] == "{":
                frames[-1][1] = str(key)
            break
        pos = m.end()
        tok = m["tok"]
        if m["key"] is not None and frames:
            frames[-1][1] = str(json.loads(m["key"]))
        elif tok in (b"{", b"["):
            frames.append([tok.decode(), 0 if tok == b"[" else None])
        elif tok in (b"}", b"]") and frames:
            frames.pop()
        elif tok == b"," and frames and frames[-1][0] == "[":
            frames[-1][1] = int(frames[-1][1] or 0) + 1
    path = "$"
    for _, at in frames:
        if isinstance(at, int):
            path += f"[{at}]"
        elif at is not None:
            path += f".{at}"
    return path


_PATTERN = re.compile(r"^Expected `str` matching regex (?P<pattern>'.*')$", re.DOTALL)


def _in_words(message: str) -> str:
    """msgspec's "Expected `str` matching regex '^(auto|cpu...)$'" as what is expected, in words."""
    if message == "Expected `float` that's a multiple of 1.0":
        return "expected an integer"
    if (m := _PATTERN.match(message)) is not None:
        regex = ast.literal_eval(m["pattern"])
        if regex in PATTERN_WORDS:
            return f"expected {PATTERN_WORDS[regex]}"
    return message


def decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode a JSON body: 400 when it is not JSON (or not UTF-8, or nested too deep), 422 naming
    the field when a value is wrong or a key is given twice."""
    check_structure(body)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, field = split_validation(exc, "$", decoder.type)
        raise InvalidInput(_in_words(message), field=field) from None
    except msgspec.DecodeError:
        raise MalformedRequest("request body is not valid JSON") from None
    except UnicodeDecodeError as exc:  # msgspec checks UTF-8 as it decodes each string
        raise MalformedRequest(f"request body is not valid UTF-8 (byte {exc.start} of a string)") from None
    except RecursionError:  # pragma: no cover - check_structure refuses deep nesting first
        raise MalformedRequest("the JSON body is nested too deeply") from None


def require_json(content_type: bytes | None) -> None:
    """415 unless the body is declared JSON: `application/json` or `application/<name>+json`,
    optionally with `charset=utf-8` (JSON is UTF-8; a form or text/plain body is refused, so that
    a web page of another origin cannot send one without a CORS preflight)."""
    if content_type is None:
        raise UnsupportedMediaType("send the request body with Content-Type: application/json")
    media, _, params = content_type.decode("latin-1").partition(";")
    media = media.strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaType(f"Content-Type {media or '(empty)'!r} is not accepted; send application/json")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(f"charset {value.strip()!r} is not accepted; JSON is UTF-8")


async def read_body(
    scope: Scope,
    receive: Receive,
    limit: int,
    timeout_s: float,
    *,
    optional: bool = False,
    headers: RequestHeaders | None = None,
) -> bytes:
    """The whole JSON request body: 415 unless its Content-Type is JSON, 413 as soon as it is known
    to exceed `limit` bytes, 408 when it has not all arrived within `timeout_s` seconds.

    `optional`: the endpoint takes no body (load, unload): a request without a body needs no
    Content-Type; one with a body, or with a Content-Type, must be JSON. `headers`: the request's,
    as the entry point found them (default: from the scope).
    """
    found = headers if headers is not None else request_headers(scope)
    content_type, length = found.content_type, found.content_length
    if content_type is not None or not optional:
        require_json(content_type)
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(
            f"request body of {int(length)} bytes exceeds the limit of {limit} bytes (max_body_bytes)"
        )
    with anyio.move_on_after(timeout_s):
        body = await _read_body(receive, limit)
        if body and content_type is None:
            require_json(content_type)
        return body
    raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s (body_read_timeout_s)")


async def _read_body(receive: Receive, limit: int) -> bytes:
    first = await receive()
    if first["type"] == "http.disconnect":
        raise MalformedRequest("the client went away before sending the whole body")
    body: bytes = first.get("body", b"")
    if not first.get("more_body", False):  # the common case: one message, no copy
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (max_body_bytes)")
        return body
    buf = bytearray(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise MalformedRequest("the client went away before sending the whole body")
        buf += message.get("body", b"")
        if len(buf) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (max_body_bytes)")
        if not message.get("more_body", False):
            return bytes(buf)
