"""One gRPC call's life at the edge: counted (a graceful stop waits for running calls and refuses
new ones with UNAVAILABLE), and its errors mapped once (`errors`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream

from ...errors import ModelMoraError
from ...security import ANONYMOUS, Identity, Permit
from .errors import internal_error, send_error
from .gate import current_permit

__all__ = ("CallContext", "Calls", "single")


@dataclass(slots=True)
class CallContext:
    """What a handler learns while it runs that its error needs (the request's parameters oneof), and
    who called (the gate's permit: None while authentication is off)."""

    parameters: str | None = None
    permit: Permit | None = None

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
        """Run one call's handler: a `ModelMoraError` ends it with its status (`send_error`), any
        other error with INTERNAL; `GRPCError` and cancellation pass through to grpclib."""
        if self.closing:
            raise GRPCError(Status.UNAVAILABLE, "the server is shutting down")
        self.running += 1
        if self.running == 1:
            self._idle = anyio.Event()
        context = CallContext(permit=current_permit())
        try:
            yield context
        except Exception as exc:
            found = single(exc)
            if isinstance(found, GRPCError | StreamTerminatedError):  # grpclib's own, and a gone client
                raise found from None
            if isinstance(found, ModelMoraError):
                await send_error(stream, found, context.parameters)
            else:
                await internal_error(stream, method, exc)
        finally:
            self.running -= 1
            if self.running == 0:
                self._idle.set()
