"""Cross-origin requests (CORS), when `cors_origins` allows some: a preflight (OPTIONS with
`Access-Control-Request-Method`) from an allowed origin is answered here, and every response to
an allowed origin carries `Access-Control-Allow-Origin` (the hot path, errors and event streams
alike). Requests from other origins get no CORS headers, so a browser keeps their answers from the
calling page; their preflight falls through to routing (405 with `Allow`)."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import Message, Scope, Send

__all__ = ("Cors",)

ALLOWED_METHODS = b"GET, POST, PUT"
ALLOWED_HEADERS = b"authorization, content-type"
EXPOSED_HEADERS = b"retry-after"
PREFLIGHT_MAX_AGE_S = 600


class Cors:
    """The CORS policy for a set of origins ("*": any)."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = frozenset(o.rstrip("/").lower().encode("latin-1") for o in origins)
        self.any = b"*" in self.origins

    @classmethod
    def from_origins(cls, origins: Iterable[str]) -> Cors | None:
        """The policy, or None when no origin is configured (CORS off)."""
        origins = tuple(origins)
        return cls(origins) if origins else None

    def allowed_origin(self, scope: Scope) -> bytes | None:
        """The request's `Origin` when it is one of ours, else None."""
        for name, value in scope["headers"]:
            if name == b"origin":
                return value if self.any or value.lower() in self.origins else None
        return None

    @staticmethod
    def is_preflight(scope: Scope) -> bool:
        return scope["method"] == "OPTIONS" and any(
            name == b"access-control-request-method" for name, _ in scope["headers"]
        )

    @staticmethod
    async def preflight(origin: bytes, send: Send) -> None:
        """204 with what an allowed origin may send."""
        headers = [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-methods", ALLOWED_METHODS),
            (b"access-control-allow-headers", ALLOWED_HEADERS),
            (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode()),
            (b"vary", b"origin"),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    def wrap(send: Send, origin: bytes) -> Send:
        """`send` adding the CORS headers to the response's start."""
        extra = [
            (b"access-control-allow-origin", origin),
            (b"access-control-expose-headers", EXPOSED_HEADERS),
            (b"vary", b"origin"),
        ]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        return send_with_cors
