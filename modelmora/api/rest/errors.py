"""Errors as responses, in one place: `ModelMoraError` keeps its status and code; anything
else is a 500 whose text never reaches the client (it is logged with a trace id).

Each HTTP protocol has its own error body (ours, OpenAI's, the Open Inference Protocol's): an
`ErrorEncoder` turns an error into that protocol's response, and the entry point picks the encoder
by path prefix for every refusal made before a protocol's own code runs (the gate's 401, 403 and
429). The headers a refusal carries (`Retry-After`, `WWW-Authenticate`, `Allow`) are the same in
every protocol (`refusal_headers`). An unknown path (404) or method (405) is an error like any
other (`EndpointNotFound`, `MethodNotAllowed`), so each protocol answers it in its own shape.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from ...errors import GrpcStatus, ModelMoraError
from ..schemas import ErrorBody, ErrorDetail

__all__ = (
    "EndpointNotFound",
    "ErrorEncoder",
    "MethodNotAllowed",
    "error_body",
    "error_response",
    "exception_handlers",
    "json_response",
    "refusal_headers",
    "unexpected",
)

log = structlog.get_logger("modelmora.api")
_encoder = msgspec.json.Encoder()

ErrorEncoder = Callable[[ModelMoraError], Response]
"""One protocol's error response for an error (its status, headers and body shape)."""


class EndpointNotFound(ModelMoraError):
    """No endpoint at this path (raised by the HTTP front ends' routing)."""

    http_status = 404
    grpc_status = GrpcStatus.NOT_FOUND
    code = "not_found"


class MethodNotAllowed(ModelMoraError):
    """The path has an endpoint, not for this method; `allow` lists the methods it takes (the `Allow`
    header)."""

    http_status = 405
    grpc_status = GrpcStatus.INVALID_ARGUMENT
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow


def refusal_headers(exc: ModelMoraError) -> dict[str, str]:
    """The headers of an error's response, whatever the protocol's body: `Retry-After` (429, 503),
    `WWW-Authenticate` (401 and 403 from the gate), `Allow` (405)."""
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    challenge = getattr(exc, "challenge", None)
    if challenge:
        headers["WWW-Authenticate"] = challenge
    allow = getattr(exc, "allow", None)
    if allow:
        headers["Allow"] = allow
    return headers


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(obj), status_code=status, media_type="application/json", headers=headers)


def error_body(exc: ModelMoraError) -> ErrorBody:
    return ErrorBody(ErrorDetail(exc.code, exc.message, exc.field, getattr(exc, "status", None)))


def error_response(exc: ModelMoraError) -> Response:
    """Our error shape: `{"error": {"code", "message", "field"}}` (the native API's `ErrorEncoder`)."""
    return json_response(error_body(exc), exc.http_status, refusal_headers(exc))


def unexpected(path: str, exc: BaseException, trace_id: str | None = None) -> Response:
    """A 500 naming the trace id under which `exc` is logged (the request's, else a new one)."""
    trace_id = trace_id or uuid.uuid4().hex
    log.error("unhandled_error", trace_id=trace_id, path=path, exc_info=exc)
    return json_response(ErrorBody(ErrorDetail("internal_error", f"internal error (trace id {trace_id})")), 500)


async def _handle_error(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, ModelMoraError)
    return error_response(exc)


async def _handle_http_error(request: HTTPRequest, exc: Exception) -> Response:
    if getattr(exc, "status_code", 404) == 405:
        allow = (getattr(exc, "headers", None) or {}).get("Allow", "")
        return error_response(MethodNotAllowed(f"method {request.method} is not allowed here", allow=allow))
    return error_response(EndpointNotFound("no such endpoint"))


async def _handle_unexpected(request: HTTPRequest, exc: Exception) -> Response:
    return unexpected(request.url.path, exc)


exception_handlers: dict[Any, Any] = {
    ModelMoraError: _handle_error,
    404: _handle_http_error,
    405: _handle_http_error,
    Exception: _handle_unexpected,
}
"""Starlette's exception handlers: the one translation of errors for the routed endpoints."""
