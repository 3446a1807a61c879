"""The events of a streaming request, then its result: what `InferenceService.open_stream` returns."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..observability import TraceContext, reset_current, set_current
from .call import Job
from .outputs import InferResult, StreamEvent

if TYPE_CHECKING:
    from .core import InferenceService

__all__ = ("InferStream",)


class InferStream:
    """The events of a streaming request, then its result (`async for` over it).

    Iteration ends after the `InferResult`; an error after events were sent is raised from
    the iteration. Close it (`aclose`) when the client goes away: the request leaves the
    queue, or its batch is stopped.
    """

    def __init__(
        self,
        service: InferenceService,
        job: Job,
        send: MemoryObjectSendStream[tuple[int, str, dict[str, Any]]],
        receive: MemoryObjectReceiveStream[tuple[int, str, dict[str, Any]]],
    ) -> None:
        self._service = service
        self._job = job
        self._send = send
        self._receive = receive
        self._finished = False
        self._recorded = False

    @property
    def trace(self) -> TraceContext:
        """The request's trace context."""
        return self._job.trace

    def _record(self, error: BaseException | None, result: InferResult | None = None) -> None:
        """Record the request once: answered (`result`), failed (`error`), or given up (neither)."""
        if self._recorded:
            return
        self._recorded = True
        job = self._job
        seconds = time.perf_counter() - job.t0
        token = set_current(job.trace)
        try:
            if result is not None:
                rec = self._service.record
                protocol = job.call.protocol
                rec.ok(job.runtime.metrics, protocol, job.version, result.timing, seconds, job.timeout_s, job.trace)
            else:
                rec = self._service.record
                rec.failed(job.record.id, job.record.task, job.call.protocol, error, seconds, job.trace)
        finally:
            reset_current(token)

    def __aiter__(self) -> InferStream:
        return self

    async def __anext__(self) -> StreamEvent | InferResult:
        if self._finished:
            raise StopAsyncIteration
        job = self._job
        with anyio.CancelScope(deadline=job.request.deadline):
            try:
                item, kind, data = await self._receive.receive()
            except anyio.EndOfStream:
                pass  # the request is done
            else:
                return StreamEvent(kind, {"index": item, **data} if item >= 0 else data)
        self._finished = True
        if not job.request.done.is_set():
            error = self._service.scheduler.unfinished_error(job.runtime, job.timeout_s)
            self._record(error)
            await self.aclose()
            raise error
        try:
            result = await self._service._result(job)
        except BaseException as exc:
            self._record(exc)
            raise
        self._record(None, result)
        return result

    async def aclose(self) -> None:
        """Stop listening: a request still queued or running is withdrawn (counted as cancelled by
        its caller)."""
        self._finished = True
        job = self._job
        if not job.request.done.is_set():
            self._record(None)  # the caller gave up
            self._service.scheduler.withdraw(job.runtime, job.request)
        job.request.on_done = None
        job.prepared.release()
        self._send.close()
        self._receive.close()
