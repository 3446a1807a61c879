"""Reading and decoding request bodies: size limits, JSON, field-naming validation errors."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from starlette.types import Receive, Scope

from ...errors import InvalidInput, MalformedRequest, PayloadTooLarge
from ...service import split_validation

__all__ = ("decode", "read_body")

T = TypeVar("T")


def decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode a JSON body: 400 when it is not JSON, 422 naming the field when a value is wrong."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, field = split_validation(exc, "$", decoder.type)
        raise InvalidInput(message, field=field) from None
    except msgspec.DecodeError:
        raise MalformedRequest("request body is not valid JSON") from None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(
                f"request body of {int(value)} bytes exceeds the limit of {limit} bytes (max_body_bytes)"
            )
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
