"""Errors as gRPC statuses, in one place: a `ModelMoraError` keeps its status (`grpc_status`), its
code and its field; anything else is INTERNAL with a trace id, its text only in the log.

A field is named as a path in the request message (`texts[3]`, `generation.max_tokens`): the core
names fields as JSON paths of the REST envelope, translated here. The status message starts with
the field ("texts[3]: text of ... characters exceeds ..."); the trailing metadata carries
`modelmora-error-code` (REST's `error.code`), `modelmora-error-field`, where retrying later
makes sense `retry-after` (seconds), and the call's `traceparent` when it has a trace.
"""

from __future__ import annotations

import re
import uuid

import structlog
from grpclib.const import Status
from grpclib.server import Stream

from ..._proto.modelmora import v1
from ...errors import ModelMoraError
from ...observability import TraceContext

__all__ = ("error_message", "internal_error", "proto_field", "send_error")

log = structlog.get_logger("modelmora.api.grpc")

_INPUT = re.compile(r"^\$\.input_data\.(?P<name>text|image)(?P<rest>.*)$")
_SIMPLE = {"$.version": "version", "$.return": "return_mode", "$.priority": "priority", "$.stream": ""}


def proto_field(field: str | None, parameters: str | None = None) -> str:
    """The request-message path of a core field ("$.input_data.text[3]" -> "texts[3]",
    "$.parameters.max_tokens" -> "generation.max_tokens" when `parameters` is the set oneof)."""
    if not field:
        return ""
    if (m := _INPUT.match(field)) is not None:
        return f"{m['name']}s{m['rest']}"
    if field == "$.parameters" or field.startswith("$.parameters."):
        return (parameters or "parameters") + field.removeprefix("$.parameters")
    if field in _SIMPLE:
        return _SIMPLE[field]
    return field.removeprefix("$.")


def error_message(exc: ModelMoraError, parameters: str | None = None) -> v1.Error:
    """The error as the `Error` message InferStream answers a failed request with."""
    field = proto_field(exc.field, parameters)
    return v1.Error(
        status=int(exc.grpc_status),
        code=exc.code,
        message=f"{field}: {exc.message}" if field else exc.message,
        field=field,
        retry_after_s=exc.retry_after_s,
    )


async def send_error(
    stream: Stream[object, object],
    exc: ModelMoraError,
    parameters: str | None = None,
    trace: TraceContext | None = None,
) -> None:
    """End the call with the error's status, message and metadata (and `trace`'s `traceparent`)."""
    error = error_message(exc, parameters)
    metadata = {"modelmora-error-code": error.code}
    if error.field:
        metadata["modelmora-error-field"] = error.field
    if error.retry_after_s is not None:
        metadata["retry-after"] = str(max(1, round(error.retry_after_s)))
    if trace is not None:
        metadata["traceparent"] = trace.traceparent
    await stream.send_trailing_metadata(status=Status(error.status), status_message=error.message, metadata=metadata)


async def internal_error(
    stream: Stream[object, object], method: str, exc: BaseException, trace: TraceContext | None = None
) -> None:
    """End the call with INTERNAL and its trace id (a new id without `trace`); the exception goes to
    the log only."""
    trace_id = trace.trace_id if trace is not None else uuid.uuid4().hex
    log.error("unhandled_error", trace_id=trace_id, method=method, exc_info=exc)
    metadata = {"modelmora-error-code": "internal_error"}
    if trace is not None:
        metadata["traceparent"] = trace.traceparent
    await stream.send_trailing_metadata(
        status=Status.INTERNAL, status_message=f"internal error (trace id {trace_id})", metadata=metadata
    )
