"""Errors in OpenAI's shape, in one place: `{"error": {"message", "type", "param", "code"}}`.

A `ModelMoraError` keeps its status, except that an invalid field (our 422) is OpenAI's 400;
`code` is our stable error code (`model_not_found` is also OpenAI's), `type` OpenAI's class of
error, `param` the request body's field at fault (as the endpoint names it, see `Fields`). 429
and 503 carry `Retry-After`, 401 and 403 `WWW-Authenticate`, 405 `Allow`. Anything else is a 500
whose text stays in the log.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import structlog
from starlette.responses import Response

from ...errors import ModelMoraError
from ..rest.errors import refusal_headers

__all__ = ("ErrorBody", "ErrorDetail", "Fields", "error_response", "openai_error", "unexpected")

log = structlog.get_logger("modelmora.api.openai")

_encoder = msgspec.json.Encoder()


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


def _type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "invalid_request_error"  # OpenAI's type for an unknown model
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error(exc: ModelMoraError) -> tuple[int, ErrorBody]:
    """The status and body of an error (its field already named as the endpoint's body names it)."""
    status = 400 if exc.http_status == 422 else exc.http_status
    return status, ErrorBody(ErrorDetail(exc.message, _type(status), exc.field, exc.code))


def error_response(exc: ModelMoraError) -> Response:
    """OpenAI's error shape (the `ErrorEncoder` of every path under `/v1/`, the gate's refusals too)."""
    status, body = openai_error(exc)
    return Response(
        _encoder.encode(body), status_code=status, media_type="application/json", headers=refusal_headers(exc)
    )


def unexpected(path: str, exc: BaseException, trace_id: str | None = None) -> Response:
    """A 500 naming the trace id under which `exc` is logged (the request's, else a new one)."""
    trace_id = trace_id or uuid.uuid4().hex
    log.error("unhandled_error", trace_id=trace_id, path=path, exc_info=exc)
    body = ErrorBody(ErrorDetail(f"internal error (trace id {trace_id})", "server_error", None, "internal_error"))
    return Response(_encoder.encode(body), status_code=500, media_type="application/json")


_INPUT = re.compile(r"^\$\.input_data\.(?:text|image)(?:\[(?P<index>\d+)\])?(?P<rest>.*)$")
_PARAMETER_NAMES = {"width": "size", "height": "size"}


@dataclass(frozen=True, slots=True)
class Fields:
    """How one endpoint names the core's fields: the core names them as JSON paths of the native
    envelope (`$.input_data.text[3]`, `$.parameters.max_tokens`), a body decoder as paths of this
    body (`$.messages[0].role`)."""

    inputs: str
    """The body field the core's inputs came from: "input", "prompt", "messages"."""
    item: Callable[[int], int | None] = lambda i: i
    """The body's index of the core's input item `i` (None: name the field without an index)."""

    def param(self, field: str | None) -> str | None:
        if not field:
            return None
        if (m := _INPUT.match(field)) is not None:
            index = m["index"]
            at = self.item(int(index)) if index is not None else None
            return self.inputs + (f"[{at}]" if at is not None else "") + m["rest"]
        if field.startswith("$.parameters."):
            name = field.removeprefix("$.parameters.")
            return _PARAMETER_NAMES.get(name.partition("[")[0].partition(".")[0], name)
        if field == "$.return":
            return "response_format"
        return field.removeprefix("$.").removeprefix("$") or None

    def rename(self, exc: ModelMoraError) -> ModelMoraError:
        """The error with its field named as this endpoint's body names it."""
        exc.field = self.param(exc.field)
        return exc
