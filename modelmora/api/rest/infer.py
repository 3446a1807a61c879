"""`POST /api/v1/infer/{model_id}`, the path every inference request takes: served straight from
ASGI by the entry point (no routing or middleware layers), with the headers and the identity the
entry point found handed in; JSON, or server-sent events with `stream: true`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ...errors import ClientGone, ModelMoraError
from ...observability import TraceContext, incoming, reset_current, set_current
from ...security import Identity
from ...service import InferCall, InferenceService, InferResult, Priority
from ..schemas import InferRequest
from .body import decode, read_body
from .edge import RequestHeaders
from .encode import response_body, sse
from .errors import error_body, error_response, json_response, unexpected

__all__ = ("INFER_PREFIX", "InferHandler", "base_url", "infer_handler")

INFER_PREFIX = "/api/v1/infer/"

InferHandler = Callable[[Scope, Receive, Send, str, Identity, RequestHeaders], Awaitable[None]]
"""Serve one inference request: scope, receive, send, the model id, the caller, its headers."""

_envelope_decoder = msgspec.json.Decoder(InferRequest)


def infer_handler(service: InferenceService) -> InferHandler:
    """The handler of `POST /api/v1/infer/{model_id}` over `service`."""
    settings = service.settings
    public_url = settings.public_url.rstrip("/") + "/" if settings.public_url else ""
    limit, body_timeout_s = settings.max_body_bytes, settings.body_read_timeout_s

    async def infer(
        scope: Scope, receive: Receive, model_id: str, trace: TraceContext, identity: Identity, headers: RequestHeaders
    ) -> Response:
        t0 = time.perf_counter()
        try:
            body = await read_body(scope, receive, limit, body_timeout_s, headers=headers)
            env = decode(_envelope_decoder, body)
        except ModelMoraError as exc:  # refused before the core saw it: counted here, without a model
            service.record.failed("", "", "rest", exc, time.perf_counter() - t0, trace)
            raise
        call = InferCall(
            model_id,
            env.input_data,
            env.parameters,
            version=env.version,
            priority=Priority.parse(int(env.priority) if isinstance(env.priority, float) else env.priority),
            timeout_s=env.timeout_seconds,
            stream=env.stream,
            return_mode=env.return_,
            protocol="rest",
            trace=trace,
            identity=identity,
        )
        encoding = str(env.parameters.get("encoding", "float"))
        base = public_url or base_url(scope)
        if env.stream:
            return await _stream(service, call, encoding, base)
        try:
            result = await service.infer(call, gone=lambda: _until_disconnect(receive))
        except ClientGone:
            return Response(status_code=499)  # nobody is listening; for the access log only
        return json_response(response_body(result, encoding, base))

    async def handle_infer(
        scope: Scope, receive: Receive, send: Send, model_id: str, identity: Identity, headers: RequestHeaders
    ) -> None:
        trace = incoming(*headers.trace())
        token = set_current(trace)
        try:
            response = await infer(scope, receive, model_id, trace, identity, headers)
        except ModelMoraError as exc:
            response = error_response(exc)
        except Exception as exc:
            response = unexpected(scope.get("path", ""), exc, trace.trace_id)
        finally:
            reset_current(token)
        response.raw_headers.append((b"traceparent", trace.traceparent.encode()))
        await response(scope, receive, send)

    return handle_infer


async def _stream(service: InferenceService, call: InferCall, encoding: str, base: str) -> Response:
    """Answer with server-sent events: the task's events (token, progress), then result or error."""
    stream = await service.open_stream(call)  # queue full, failed model...: a plain JSON error

    async def body() -> AsyncIterator[bytes]:
        try:
            async for item in stream:
                if isinstance(item, InferResult):
                    yield sse("result", response_body(item, encoding, base))
                else:
                    yield sse(item.kind, item.data)
        except ModelMoraError as exc:
            yield sse("error", error_body(exc))
        finally:
            await stream.aclose()  # the client went away: the request leaves the queue, its batch stops

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _until_disconnect(receive: Receive) -> None:
    """Return when the client goes away (the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def base_url(scope: Scope) -> str:
    """This server's base URL as the request's connection reached it: scheme, the local address of
    the connection, root path. Never the client's Host header, which anyone can set (a result URL
    would otherwise point wherever the client said)."""
    host, port = scope.get("server") or ("127.0.0.1", 80)
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    scheme = scope.get("scheme", "http")
    default = 443 if scheme == "https" else 80
    netloc = host if port in (None, default) else f"{host}:{port}"
    return f"{scheme}://{netloc}{scope.get('root_path', '')}/"
