"""The HTTP entry point: CORS first (when configured; a preflight carries no credentials), then one
pass over the request's headers, then the gate (token, scope and limits, before any body is read),
then `POST /api/v1/infer/{model_id}` is served directly, and so is every path of a drop-in protocol
(`/v1/`, `/v2`); everything else goes to Starlette.

Each drop-in protocol is a `FrontEnd`: its path prefix, its application and its `ErrorEncoder`. A
refusal made here (the gate's 401, 403, 429) is encoded by the front end of the request's path, so
that an OpenAI client gets OpenAI's error body and an Open Inference Protocol client OIP's.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from ...errors import ModelMoraError
from ...security import ANONYMOUS, Gate, Permit
from ...security import Scope as AuthScope
from ..access import RestAccess
from .cors import Cors
from .edge import HEADERS_KEY, IDENTITY_KEY, RequestHeaders, traced
from .errors import ErrorEncoder, error_response
from .infer import INFER_PREFIX, InferHandler

__all__ = ("ApiEntry", "FrontEnd")


@dataclass(frozen=True, slots=True)
class FrontEnd:
    """A drop-in protocol served under a path prefix, with its own error shape."""

    prefix: str
    """Every path that starts with it is this protocol's ("/v1/", "/v2")."""
    app: ASGIApp
    encode_error: ErrorEncoder


class ApiEntry:
    """The ASGI application of the HTTP listener.

    Args:
        app: the routed endpoints (native API, health, docs, results, jobs).
        infer: the handler of `POST /api/v1/infer/{model_id}`.
        cors: the CORS policy (None: off).
        gate: authentication, scopes and limits.
        access: what each method and path needs.
        front_ends: the drop-in protocols, by path prefix.
    """

    def __init__(
        self,
        app: Starlette,
        infer: InferHandler,
        cors: Cors | None,
        gate: Gate,
        access: RestAccess,
        front_ends: list[FrontEnd] | None = None,
    ) -> None:
        self.app = app
        self.infer = infer
        self.cors = cors
        self.gate = gate
        self.access = access
        self.front_ends = tuple(front_ends or ())

    def front_end(self, path: str) -> FrontEnd | None:
        """The drop-in protocol serving `path` (None: the native API's)."""
        for front in self.front_ends:
            if path.startswith(front.prefix):
                return front
        return None

    def error_encoder(self, path: str) -> ErrorEncoder:
        """How a refusal of a request for `path` is answered: in its protocol's error shape."""
        front = self.front_end(path)
        return front.encode_error if front is not None else error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.cors is not None:
            origin = self.cors.allowed_origin(scope)
            if origin is not None:
                if self.cors.is_preflight(scope):
                    await self.cors.preflight(origin, send)
                    return
                send = self.cors.wrap(send, origin)
        headers = RequestHeaders(scope["headers"])
        model_id = None
        path = scope["path"]
        if scope["method"] == "POST" and path.startswith(INFER_PREFIX):
            model_id = path[len(INFER_PREFIX) :]
            if not model_id or "/" in model_id:
                model_id = None
        if not self.gate.enabled:  # every caller is anonymous: nothing to check or give back
            if model_id is not None:
                await self.infer(scope, receive, send, model_id, ANONYMOUS, headers)
            else:
                scope[HEADERS_KEY] = headers
                await self._route(scope, receive, send, headers)
            return
        permit = await self._admit(scope, receive, send, model_id, headers)
        if permit is None:
            return
        try:
            if model_id is not None:
                await self.infer(scope, receive, send, model_id, permit.identity, headers)
            else:
                scope[HEADERS_KEY] = headers
                scope[IDENTITY_KEY] = permit.identity
                await self._route(scope, receive, send, headers)
        finally:
            permit.release()

    async def _route(self, scope: Scope, receive: Receive, send: Send, headers: RequestHeaders) -> None:
        """A drop-in protocol's path to its front end, in the request's trace context (`traced`);
        anything else to Starlette."""
        front = self.front_end(scope["path"])
        if front is None:
            await self.app(scope, receive, send)
        else:
            await traced(front.app, scope, receive, send, headers)

    async def _admit(
        self, scope: Scope, receive: Receive, send: Send, model_id: str | None, headers: RequestHeaders
    ) -> Permit | None:
        """The request's permit, or None once it has been refused (401, 403, 429, in the error shape
        of the path's protocol)."""
        access = AuthScope.INFER if model_id is not None else self.access(scope["method"], scope["path"])
        try:
            return self.gate.admit(access, headers.authorization_text())
        except ModelMoraError as exc:
            await self.error_encoder(scope["path"])(exc)(scope, receive, send)
            return None
