"""What the HTTP entry point learns about a request once and hands on: the headers the edge needs,
found in one pass over the request's headers (`RequestHeaders`), and the caller's `Identity` as the
gate admitted it. Both travel in the ASGI scope to the endpoints that are routed (the hot path gets
them as arguments). A drop-in protocol's request also gets its trace context there (`traced`): the
caller's `traceparent` continued, current while it is served, and returned as the response's
`traceparent` header, as on the native API's inference responses."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...observability import TraceContext, incoming, reset_current, set_current
from ...security import ANONYMOUS, Identity

__all__ = (
    "HEADERS_KEY",
    "IDENTITY_KEY",
    "TRACE_KEY",
    "RequestHeaders",
    "identity_of",
    "request_headers",
    "trace_of",
    "traced",
)

IDENTITY_KEY = "modelmora.identity"
"""Where the gate leaves the caller's `Identity` in the ASGI scope (absent: authentication is off)."""
HEADERS_KEY = "modelmora.headers"
"""Where the entry point leaves the request's `RequestHeaders` in the ASGI scope."""
TRACE_KEY = "modelmora.trace"
"""Where `traced` leaves the request's `TraceContext` in the ASGI scope."""


class RequestHeaders:
    """The request headers the edge acts on, as sent (bytes; None where absent): `Authorization`
    (the first one), `Content-Type`, `Content-Length`, `traceparent`, `tracestate` (the last one of
    each). ASGI servers give header names in lower case."""

    __slots__ = ("authorization", "content_length", "content_type", "traceparent", "tracestate")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        authorization = content_type = content_length = traceparent = tracestate = None
        for name, value in raw:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                content_length = value
            elif name == b"authorization":
                if authorization is None:
                    authorization = value
            elif name == b"traceparent":
                traceparent = value
            elif name == b"tracestate":
                tracestate = value
        self.authorization: bytes | None = authorization
        self.content_type: bytes | None = content_type
        self.content_length: bytes | None = content_length
        self.traceparent: bytes | None = traceparent
        self.tracestate: bytes | None = tracestate

    def authorization_text(self) -> str | None:
        return None if self.authorization is None else self.authorization.decode("latin-1")

    def trace(self) -> tuple[str | None, str | None]:
        """The W3C `traceparent` and `tracestate` values (None where absent)."""
        parent, state = self.traceparent, self.tracestate
        return (
            None if parent is None else parent.decode("latin-1"),
            None if state is None else state.decode("latin-1"),
        )


def request_headers(scope: Scope) -> RequestHeaders:
    """The request's headers as the entry point found them (found now when it did not pass them on,
    as for an application mounted without it)."""
    found: RequestHeaders | None = scope.get(HEADERS_KEY)
    return found if found is not None else RequestHeaders(scope["headers"])


def identity_of(scope: Scope) -> Identity:
    """The caller of a request, as the gate admitted it (`ANONYMOUS` while authentication is off)."""
    identity: Identity = scope.get(IDENTITY_KEY, ANONYMOUS)
    return identity


def trace_of(scope: Scope) -> TraceContext:
    """The request's trace context as `traced` found it (found now, and kept, when the request was
    not served through it, as for an application mounted without the entry point)."""
    trace: TraceContext | None = scope.get(TRACE_KEY)
    if trace is None:
        trace = scope[TRACE_KEY] = incoming(*request_headers(scope).trace())
    return trace


async def traced(app: ASGIApp, scope: Scope, receive: Receive, send: Send, headers: RequestHeaders) -> None:
    """Serve an HTTP request with `app` in its trace context: the caller's `traceparent` continued
    (a new trace without one), left in the scope (`trace_of`), current while `app` serves it (logs
    and the core's calls carry it), and sent back as the response's `traceparent` header."""
    trace = scope[TRACE_KEY] = incoming(*headers.trace())
    traceparent = (b"traceparent", trace.traceparent.encode())

    async def send_traced(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), traceparent]}
        await send(message)

    token = set_current(trace)
    try:
        await app(scope, receive, send_traced)
    finally:
        reset_current(token)
