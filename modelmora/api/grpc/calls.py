"""One gRPC call's life at the edge: counted (a graceful stop waits for running calls and refuses
new ones with UNAVAILABLE), traced, and its errors mapped once (`errors`).

Each call has a W3C trace context: the caller's `traceparent` / `tracestate` metadata continued with
a span of this server's, or a new trace. It is the current trace while the handler runs (log events
carry its `trace_id`), the inference requests the call makes belong to it, and the call's trailing
metadata returns it as `traceparent`, on success and on error, as REST's response header does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream
from h2.exceptions import StreamClosedError

from ...errors import ModelMoraError
from ...observability import TraceContext, incoming, reset_current, set_current
from ...security import ANONYMOUS, Identity, Permit
from .errors import internal_error, send_error
from .gate import current_permit

__all__ = ("CallContext", "Calls", "call_trace", "single")


def call_trace(metadata: Any) -> TraceContext:
    """The call's trace context from its `traceparent` / `tracestate` metadata (a new trace when
    there is none or it is invalid)."""
    if not metadata:
        return incoming(None)
    return incoming(metadata.get("traceparent"), metadata.get("tracestate"))


@dataclass(slots=True)
class CallContext:
    """The call's trace, who called (the gate's permit: None while authentication is off), and what a
    handler learns while it runs that its error needs (the request's parameters oneof)."""

    trace: TraceContext
    permit: Permit | None = None
    parameters: str | None = None
    finished: bool = False
    """The handler sent the trailers itself (`finish`)."""

    async def finish(self, stream: Stream[Any, Any]) -> None:
        """End the call now with OK and the trace (instead of when the handler returns)."""
        await stream.send_trailing_metadata(metadata={"traceparent": self.trace.traceparent})
        self.finished = True

    @property
    def identity(self) -> Identity:
        return self.permit.identity if self.permit is not None else ANONYMOUS


def single(exc: BaseException) -> BaseException:
    """The one exception inside nested exception groups of one member each (a task group's), else
    the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Calls:
    """The calls running now, for a graceful stop."""

    def __init__(self) -> None:
        self.running = 0
        self.closing = False
        self._idle = anyio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return when no call runs."""
        await self._idle.wait()

    @asynccontextmanager
    async def guard(self, stream: Stream[object, object], method: str) -> AsyncIterator[CallContext]:
        """Run one call's handler: success ends it with OK, a `ModelMoraError` with its status
        (`send_error`), any other error with INTERNAL, each with the call's `traceparent` in the
        trailing metadata; `GRPCError` and cancellation pass through to grpclib."""
        if self.closing:
            raise GRPCError(Status.UNAVAILABLE, "the server is shutting down")
        self.running += 1
        if self.running == 1:
            self._idle = anyio.Event()
        context = CallContext(call_trace(stream.metadata), current_permit())
        token = set_current(context.trace)
        try:
            yield context
            try:
                if not context.finished:
                    await context.finish(stream)
            except StreamClosedError:
                return  # the client reset the stream as it ended: nobody to tell
        except Exception as exc:
            found = single(exc)
            if isinstance(found, GRPCError | StreamTerminatedError):  # grpclib's own, and a gone client
                raise found from None
            if isinstance(found, ModelMoraError):
                await send_error(stream, found, context.parameters, context.trace)
            else:
                await internal_error(stream, method, exc, context.trace)
        finally:
            reset_current(token)
            self.running -= 1
            if self.running == 0:
                self._idle.set()
