"""The InferenceService servicer: Infer, InferStream and Generate over the inference core.

Each handler reads its request messages, calls `modelmora.service` and encodes the answer. The
call's gRPC deadline bounds every request's deadline; when grpclib cancels a handler (the client
cancelled the call or closed the connection, or the deadline passed) the core withdraws its queued
requests and stops its running ones, exactly as a REST disconnect does.
"""

from __future__ import annotations

from typing import Any, cast

import anyio
import structlog
from grpclib.const import Cardinality, Handler
from grpclib.server import Stream

from ..._proto.modelmora import v1
from ...errors import InvalidInput, ModelMoraError, RateLimited
from ...security import Permit
from ...service import InferenceService, InferResult
from .calls import CallContext, Calls
from .decode import decode_call, parameters_name
from .encode import event_message, infer_response
from .errors import error_message
from .wire import corked, infer_response_bytes, infer_stream_answer_bytes

__all__ = ("InferenceServicer",)

log = structlog.get_logger("modelmora.api.grpc")

_PATH = "/modelmora.v1.InferenceService/"


class InferenceServicer:
    """`modelmora.v1.InferenceService` over the core; `base_url` makes stored result URLs absolute."""

    def __init__(self, service: InferenceService, calls: Calls, base_url: str) -> None:
        self.service = service
        self.calls = calls
        self.base_url = base_url

    def __mapping__(self) -> dict[str, Handler]:
        return {
            _PATH + "Infer": Handler(self.infer, Cardinality.UNARY_UNARY, v1.InferRequest, v1.InferResponse),
            _PATH + "InferStream": Handler(
                self.infer_stream, Cardinality.STREAM_STREAM, v1.InferRequest, v1.InferStreamResponse
            ),
            _PATH + "Generate": Handler(self.generate, Cardinality.UNARY_STREAM, v1.InferRequest, v1.GenerateEvent),
        }

    async def infer(self, stream: Stream[v1.InferRequest, v1.InferResponse]) -> None:
        async with self.calls.guard(stream, "Infer") as context:  # type: ignore[arg-type]
            req = await stream.recv_message()
            assert req is not None  # grpclib: a unary call has its message
            context.parameters = parameters_name(req)
            result = await self.service.infer(
                decode_call(req, stream.deadline, identity=context.identity, trace=context.trace)
            )
            answer = infer_response_bytes(result, req.request_id, self.base_url)
            with corked(stream):  # headers, answer and trailers in one write
                await stream.send_message(cast(Any, answer))
                await context.finish(stream)

    async def generate(self, stream: Stream[v1.InferRequest, v1.GenerateEvent]) -> None:
        async with self.calls.guard(stream, "Generate") as context:  # type: ignore[arg-type]
            req = await stream.recv_message()
            assert req is not None
            context.parameters = parameters_name(req)
            call = decode_call(req, stream.deadline, stream=True, identity=context.identity, trace=context.trace)
            events = await self.service.open_stream(call)
            try:
                async for item in events:
                    if isinstance(item, InferResult):
                        message = v1.GenerateEvent(result=infer_response(item, req.request_id, self.base_url))
                    else:
                        message = event_message(item)
                    await stream.send_message(message)
            finally:
                await events.aclose()  # cancelled: the request leaves the queue, its batch stops

    async def infer_stream(self, stream: Stream[v1.InferRequest, v1.InferStreamResponse]) -> None:
        """Requests run concurrently as they arrive; each answer goes out when ready (one writer at
        a time). A request id still in flight on this stream is refused, so each is answered once.
        Every request of the stream belongs to the call's trace."""
        async with self.calls.guard(stream, "InferStream") as context:  # type: ignore[arg-type]
            sending = anyio.Lock()
            in_flight: set[str] = set()

            async def answer(response: v1.InferStreamResponse | bytes) -> None:
                async with sending:
                    await stream.send_message(cast(Any, response))  # a message, or one encoded already

            async def refuse(req: v1.InferRequest, exc: ModelMoraError) -> None:
                await answer(v1.InferStreamResponse(request_id=req.request_id, error=error_message(exc)))

            async def run(req: v1.InferRequest) -> None:
                rid = req.request_id
                try:
                    response = await self._one(req, stream, context)
                    await answer(response)
                finally:
                    in_flight.discard(rid)

            charged = True  # admitting the call counted its first message
            async with anyio.create_task_group() as tg:
                async for req in stream:
                    if not req.request_id:
                        tg.start_soon(refuse, req, InvalidInput("request_id is required", field="request_id"))
                    elif req.request_id in in_flight:
                        error = InvalidInput(f"request_id {req.request_id!r} is in flight already", field="request_id")
                        tg.start_soon(refuse, req, error)
                    elif not charged and (limited := _over_rate(context.permit)) is not None:
                        tg.start_soon(refuse, req, limited)  # each message is a request for the rate limit
                    else:
                        charged = False
                        in_flight.add(req.request_id)
                        tg.start_soon(run, req)

    async def _one(
        self, req: v1.InferRequest, stream: Stream[v1.InferRequest, v1.InferStreamResponse], context: CallContext
    ) -> v1.InferStreamResponse | bytes:
        """One request of an InferStream: its answer (encoded), or its error (the stream goes on)."""
        rid = req.request_id
        parameters = None
        try:
            parameters = parameters_name(req)
            result = await self.service.infer(
                decode_call(req, stream.deadline, identity=context.identity, trace=context.trace)
            )
            return infer_stream_answer_bytes(result, rid, self.base_url)
        except ModelMoraError as exc:
            return v1.InferStreamResponse(request_id=rid, error=error_message(exc, parameters))
        except Exception as exc:
            trace_id = context.trace.trace_id
            log.error("unhandled_error", trace_id=trace_id, method="InferStream", exc_info=exc)
            error = v1.Error(status=13, code="internal_error", message=f"internal error (trace id {trace_id})")
            return v1.InferStreamResponse(request_id=rid, error=error)


def _over_rate(permit: Permit | None) -> RateLimited | None:
    """Charge one InferStream message to its token's rate: the refusal, or None when it may run."""
    if permit is None:
        return None
    try:
        permit.charge()
    except RateLimited as exc:
        return exc
    return None
