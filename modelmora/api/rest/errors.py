"""Errors as responses, in one place: `ModelMoraError` keeps its status and code; anything
else is a 500 whose text never reaches the client (it is logged with a trace id)."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import structlog
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from ...errors import ModelMoraError
from ..schemas import ErrorBody, ErrorDetail

__all__ = ("error_body", "error_response", "exception_handlers", "json_response", "unexpected")

log = structlog.get_logger("modelmora.api")
_encoder = msgspec.json.Encoder()


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(obj), status_code=status, media_type="application/json", headers=headers)


def error_body(exc: ModelMoraError) -> ErrorBody:
    return ErrorBody(ErrorDetail(exc.code, exc.message, exc.field, getattr(exc, "status", None)))


def error_response(exc: ModelMoraError) -> Response:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    challenge = getattr(exc, "challenge", None)
    if challenge:  # 401 and 403 from the gate
        headers["WWW-Authenticate"] = challenge
    return json_response(error_body(exc), exc.http_status, headers)


def unexpected(path: str, exc: BaseException, trace_id: str | None = None) -> Response:
    """A 500 naming the trace id under which `exc` is logged (the request's, else a new one)."""
    trace_id = trace_id or uuid.uuid4().hex
    log.error("unhandled_error", trace_id=trace_id, path=path, exc_info=exc)
    return json_response(ErrorBody(ErrorDetail("internal_error", f"internal error (trace id {trace_id})")), 500)


async def _handle_error(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, ModelMoraError)
    return error_response(exc)


async def _handle_http_error(request: HTTPRequest, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    code = "not_found" if status == 404 else "method_not_allowed"
    msg = "no such endpoint" if status == 404 else f"method {request.method} is not allowed here"
    return json_response(ErrorBody(ErrorDetail(code, msg)), status, getattr(exc, "headers", None))


async def _handle_unexpected(request: HTTPRequest, exc: Exception) -> Response:
    return unexpected(request.url.path, exc)


exception_handlers: dict[Any, Any] = {
    ModelMoraError: _handle_error,
    404: _handle_http_error,
    405: _handle_http_error,
    Exception: _handle_unexpected,
}
"""Starlette's exception handlers: the one translation of errors for the routed endpoints."""
