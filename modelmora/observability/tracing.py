"""W3C trace context: what each request carries from the client to the worker and back.

A front end reads the caller's `traceparent` (a REST header, gRPC metadata) with `incoming()`,
which parses it with OpenTelemetry's W3C propagator and gives the request a span id of its own,
or starts a new trace when there is none or it is invalid. The core sets it as the current trace
(`set_current`) while it serves the request: every log event written meanwhile carries its
`trace_id` (`add_trace_id`, a structlog processor), the request's batch takes it into the worker,
and the front end returns `TraceContext.traceparent` to the caller.

Spans are exported only when `otlp_endpoint` is configured (`export`); this module needs only
`opentelemetry-api`.
"""

from __future__ import annotations

import random
from collections.abc import MutableMapping
from contextvars import ContextVar, Token
from typing import Any

import msgspec
from opentelemetry.trace import get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = (
    "TraceContext",
    "add_trace_id",
    "current_trace",
    "detach",
    "incoming",
    "new_trace",
    "reset_current",
    "set_current",
)

_PROPAGATOR = TraceContextTextMapPropagator()
_current: ContextVar[TraceContext | None] = ContextVar("modelmora_trace", default=None)
_bits = random.getrandbits


class TraceContext(msgspec.Struct, frozen=True, gc=False):
    """One request's place in a trace: the trace, this server's span, and the caller's span."""

    trace_id: str
    """32 lowercase hex digits."""
    span_id: str
    """This server's span for the request: 16 hex digits."""
    parent_span_id: str = ""
    """The caller's span ("" when the trace starts here)."""
    flags: int = 1
    """W3C trace flags (bit 0: sampled), passed on as received; 1 for a trace started here."""

    @property
    def traceparent(self) -> str:
        """The `traceparent` to return to the caller (and to pass to whatever this request calls)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


def _span_id() -> str:
    return f"{_bits(64) or 1:016x}"


def new_trace() -> TraceContext:
    """A new trace, started by this request."""
    return TraceContext(f"{_bits(128) or 1:032x}", _span_id())


def incoming(traceparent: str | None, tracestate: str | None = None) -> TraceContext:
    """The trace context of a request whose caller sent `traceparent` (None: none sent).

    A valid header continues the caller's trace, with a new span id for this server; a missing or
    invalid one (wrong version format, all-zero ids, bad hex) starts a new trace.
    """
    if traceparent:
        carrier = {"traceparent": traceparent}
        if tracestate:
            carrier["tracestate"] = tracestate
        ctx = get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
        if ctx.is_valid:
            return TraceContext(f"{ctx.trace_id:032x}", _span_id(), f"{ctx.span_id:016x}", int(ctx.trace_flags))
    return new_trace()


def current_trace() -> TraceContext | None:
    """The trace of the request being served by this task, if any."""
    return _current.get()


def set_current(trace: TraceContext) -> Token[TraceContext | None]:
    """Make `trace` the current one (until `reset_current(token)`)."""
    return _current.set(trace)


def reset_current(token: Token[TraceContext | None]) -> None:
    _current.reset(token)


def detach() -> None:
    """No current trace in this task from now on: a long-lived task started while a request was
    served (a model's task, started by its first request) would otherwise log under its trace id."""
    _current.set(None)


def add_trace_id(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the current request's `trace_id` on every event logged while it is served."""
    trace = _current.get()
    if trace is not None and "trace_id" not in event:
        event["trace_id"] = trace.trace_id
    return event
