"""The REST front end: a thin adapter that decodes JSON into the core's calls and encodes
its typed results. `POST /api/v1/infer/{model_id}` is served straight from ASGI (no routing
or middleware layers on the path every request takes); everything else goes to Starlette.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ...config import ModelSettings
from ...errors import ClientGone, ModelMoraError
from ...registry import ModelRecord
from ...results import FilesystemResultStore, result_route
from ...service import InferCall, InferenceService, InferResult, Priority
from .. import oip, openai, openapi
from ..schemas import InferRequest, ModelInfo, ModelList, ModelVersionInfo
from .body import decode, read_body
from .cors import Cors
from .encode import response_body, sse
from .errors import error_body, error_response, exception_handlers, json_response, unexpected

__all__ = ("create_app",)


class _Empty(msgspec.Struct, forbid_unknown_fields=True):
    """The body of load and unload, when one is sent: `{}`."""


_envelope_decoder = msgspec.json.Decoder(InferRequest)
_settings_decoder = msgspec.json.Decoder(ModelSettings)
_empty_decoder = msgspec.json.Decoder(_Empty)
_INFER_PREFIX = "/api/v1/infer/"


def _model_info(rec: ModelRecord) -> ModelInfo:
    return ModelInfo(
        rec.id,
        rec.task,
        rec.source,
        rec.active_version,
        [ModelVersionInfo(v.version, v.revision, v.size_bytes, len(v.files), v.created_at) for v in rec.versions],
        msgspec.convert(rec.settings, ModelSettings),
    )


def create_app(service: InferenceService) -> ASGIApp:
    """The ASGI application over the inference core (a filesystem result store also serves its
    signed URLs here)."""
    settings = service.settings
    public_url = settings.public_url.rstrip("/") + "/" if settings.public_url else ""
    limit, body_timeout_s = settings.max_body_bytes, settings.body_read_timeout_s

    async def infer(scope: Scope, receive: Receive, model_id: str) -> Response:
        env = decode(_envelope_decoder, await read_body(scope, receive, limit, body_timeout_s))
        call = InferCall(
            model_id,
            env.input_data,
            env.parameters,
            version=env.version,
            priority=Priority.parse(int(env.priority) if isinstance(env.priority, float) else env.priority),
            timeout_s=env.timeout_seconds,
            stream=env.stream,
            return_mode=env.return_,
        )
        encoding = str(env.parameters.get("encoding", "float"))
        base_url = public_url or _base_url(scope)
        if env.stream:
            return await _stream(service, call, encoding, base_url)
        try:
            result = await service.infer(call, gone=lambda: _until_disconnect(receive))
        except ClientGone:
            return Response(status_code=499)  # nobody is listening; for the access log only
        return json_response(response_body(result, encoding, base_url))

    async def handle_infer(scope: Scope, receive: Receive, send: Send, model_id: str) -> None:
        try:
            response = await infer(scope, receive, model_id)
        except ModelMoraError as exc:
            response = error_response(exc)
        except Exception as exc:
            response = unexpected(scope.get("path", ""), exc)
        await response(scope, receive, send)

    async def list_models(request: HTTPRequest) -> Response:
        recs = await service.models(request.query_params.get("task_type"))
        return json_response(ModelList([_model_info(r) for r in recs]))

    async def model(request: HTTPRequest) -> Response:
        """GET: one model; PUT: replace its settings (fields left out take the server's defaults)."""
        model_id = request.path_params["model_id"]
        if request.method == "PUT":
            update = decode(_settings_decoder, await read_body(request.scope, request.receive, limit, body_timeout_s))
            return json_response(_model_info(await service.update_settings(model_id, update)))
        return json_response(_model_info(await service.model(model_id)))

    async def no_body(request: HTTPRequest) -> None:
        """Load and unload take no body: none (then no Content-Type is needed), or a JSON `{}`."""
        body = await read_body(request.scope, request.receive, limit, body_timeout_s, optional=True)
        if body:
            decode(_empty_decoder, body)

    async def load_model(request: HTTPRequest) -> Response:
        """Load (and warm up) a model now; waits until it is ready."""
        await no_body(request)
        model_id, version = request.path_params["model_id"], request.query_params.get("version")
        return json_response(await service.load(model_id, version))

    async def unload_model(request: HTTPRequest) -> Response:
        """Drain the model's queue, stop its worker, give its memory back."""
        await no_body(request)
        model_id, version = request.path_params["model_id"], request.query_params.get("version")
        return json_response(await service.unload(model_id, version))

    async def status(request: HTTPRequest) -> Response:
        return json_response(await service.status())

    async def live(request: HTTPRequest) -> Response:
        return json_response({"status": "ok"})

    async def ready(request: HTTPRequest) -> Response:
        reason = await service.ready()
        if reason is not None:
            return json_response({"status": "unavailable", "reason": reason}, 503)
        return json_response({"status": "ok"})

    async def health_models(request: HTTPRequest) -> Response:
        health = await service.health()
        return json_response(health, 200 if all(h.healthy for h in health.models) else 503)

    async def openapi_json(request: HTTPRequest) -> Response:
        return Response(openapi.document_bytes(), media_type="application/json")

    async def docs(request: HTTPRequest) -> HTMLResponse:
        return HTMLResponse(openapi.DOCS_HTML)

    async def infer_via_router(request: HTTPRequest) -> Response:  # pragma: no cover - `_Api` serves these
        raise AssertionError("served by _Api")

    routes = [
        # POSTs are served by `_Api` before routing; the route gives other methods their 405
        Route("/api/v1/infer/{model_id}", infer_via_router, methods=["POST"]),
        Route("/api/v1/models", list_models, methods=["GET"]),
        Route("/api/v1/models/{model_id}", model, methods=["GET", "PUT"]),  # one route: 405 lists both
        Route("/api/v1/models/{model_id}/load", load_model, methods=["POST"]),
        Route("/api/v1/models/{model_id}/unload", unload_model, methods=["POST"]),
        Route("/api/v1/status", status, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/health/models", health_models, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Mount("/docs/assets", app=StaticFiles(directory=openapi.swagger_assets_dir()), name="docs-assets"),
    ]
    if isinstance(service.results, FilesystemResultStore):
        routes.append(result_route(service.results))
    app = Starlette(routes=routes, exception_handlers=exception_handlers)
    protocols = {openai.PREFIX: openai.create_openai_app(service), oip.PREFIX: oip.create_oip_app(service)}
    return _Api(app, handle_infer, Cors.from_origins(settings.cors_origins), protocols)


async def _stream(service: InferenceService, call: InferCall, encoding: str, base_url: str) -> Response:
    """Answer with server-sent events: the task's events (token, progress), then result or error."""
    stream = await service.open_stream(call)  # queue full, failed model...: a plain JSON error

    async def body() -> AsyncIterator[bytes]:
        try:
            async for item in stream:
                if isinstance(item, InferResult):
                    yield sse("result", response_body(item, encoding, base_url))
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


class _Api:
    """The ASGI entry point: CORS first (when configured), then `POST /api/v1/infer/{model_id}` is
    served directly, and so is every path of a drop-in protocol (`/v1/`, `/v2`); everything else
    goes to Starlette."""

    def __init__(
        self,
        app: Starlette,
        infer: Callable[[Scope, Receive, Send, str], Awaitable[None]],
        cors: Cors | None,
        protocols: dict[str, ASGIApp] | None = None,
    ) -> None:
        self.app = app
        self.infer = infer
        self.cors = cors
        self.protocols = protocols or {}
        """Path prefix -> the drop-in protocol's front end serving every path under it."""

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
        if scope["method"] == "POST" and scope["path"].startswith(_INFER_PREFIX):
            model_id = scope["path"][len(_INFER_PREFIX) :]
            if model_id and "/" not in model_id:
                await self.infer(scope, receive, send, model_id)
                return
        for prefix, protocol in self.protocols.items():
            if scope["path"].startswith(prefix):
                await protocol(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _base_url(scope: Scope) -> str:
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
