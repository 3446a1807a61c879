"""The REST front end: a thin adapter that decodes JSON into the core's calls and encodes
its typed results. `POST /api/v1/infer/{model_id}` is served straight from ASGI (no routing
or middleware layers on the path every request takes); everything else goes to Starlette.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ...config import ModelSettings
from ...errors import ClientGone, InvalidInput, ModelMoraError
from ...jobs import JobRunner
from ...observability import TraceContext, incoming, reset_current, set_current
from ...registry import ModelRecord, semver_key
from ...results import FilesystemResultStore, result_route
from ...security import ANONYMOUS, Gate, Identity, Permit, audited
from ...security import Scope as AuthScope
from ...service import InferCall, InferenceService, InferResult, Operation, Priority, RegisterCall
from .. import oip, openai, openapi
from ..access import RestAccess
from ..schemas import (
    ActivateVersion,
    DownloadVersion,
    InferRequest,
    ModelInfo,
    ModelList,
    ModelVersionInfo,
    RegisterModel,
)
from .body import decode, read_body
from .cors import Cors
from .encode import response_body, sse
from .errors import error_body, error_response, exception_handlers, json_response, unexpected
from .jobs import job_routes

__all__ = ("create_app",)

_IDENTITY_KEY = "modelmora.identity"
"""Where the gate leaves the caller's `Identity` in the ASGI scope for the routed endpoints."""


def _identity_of(request: HTTPRequest) -> Identity:
    """The caller of a routed request, as the gate admitted it."""
    identity: Identity = request.scope.get(_IDENTITY_KEY, ANONYMOUS)
    return identity


class _Empty(msgspec.Struct, forbid_unknown_fields=True):
    """The body of load and unload, when one is sent: `{}`."""


_envelope_decoder = msgspec.json.Decoder(InferRequest)
_settings_decoder = msgspec.json.Decoder(ModelSettings)
_empty_decoder = msgspec.json.Decoder(_Empty)
_activate_decoder = msgspec.json.Decoder(ActivateVersion)
_register_decoder = msgspec.json.Decoder(RegisterModel)
_download_decoder = msgspec.json.Decoder(DownloadVersion)
_metadata_decoder = msgspec.json.Decoder(dict[str, Any])
MAX_PAGE = 1000
"""`GET /api/v1/models?limit=` at most (and by default)."""
_INFER_PREFIX = "/api/v1/infer/"


def _model_info(rec: ModelRecord) -> ModelInfo:
    versions = sorted(rec.versions, key=lambda v: semver_key(v.version))
    return ModelInfo(
        rec.id,
        rec.task,
        rec.source,
        rec.active_version,
        [ModelVersionInfo(v.version, v.revision, v.size_bytes, len(v.files), v.created_at, v.files) for v in versions],
        msgspec.convert(rec.settings, ModelSettings),
        rec.metadata,
        rec.active_pinned,
        rec.created_at,
        rec.updated_at,
    )


def _accepted(op: Operation) -> Response:
    """202 with the operation, and where to poll it."""
    return json_response(op, 202, {"Location": f"/api/v1/operations/{op.id}"})


def _query_int(request: HTTPRequest, name: str, default: int, maximum: int) -> int:
    """A non-negative integer query parameter (422 naming it otherwise)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > maximum:
        raise InvalidInput(f"{name} must be an integer from 0 to {maximum} (got {raw!r})", field=name)
    return int(raw)


def _query_flag(request: HTTPRequest, name: str) -> bool:
    raw = request.query_params.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise InvalidInput(f"{name} must be true or false (got {raw!r})", field=name)
    return raw in ("true", "1")


def create_app(service: InferenceService, gate: Gate | None = None, jobs: JobRunner | None = None) -> ASGIApp:
    """The ASGI application over the inference core (a filesystem result store also serves its
    signed URLs here; with `jobs`, the async jobs endpoints too), behind `gate` (default: one from
    the `[auth]` settings).

    Raises:
        TokenError: no `gate` given, and the `[auth]` tokens are malformed or unreadable.
    """
    settings = service.settings
    public_url = settings.public_url.rstrip("/") + "/" if settings.public_url else ""
    limit, body_timeout_s = settings.max_body_bytes, settings.body_read_timeout_s

    metrics = service.metrics

    async def infer(scope: Scope, receive: Receive, model_id: str, trace: TraceContext, identity: Identity) -> Response:
        t0 = time.perf_counter()
        try:
            env = decode(_envelope_decoder, await read_body(scope, receive, limit, body_timeout_s))
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
        base_url = public_url or _base_url(scope)
        if env.stream:
            return await _stream(service, call, encoding, base_url)
        try:
            result = await service.infer(call, gone=lambda: _until_disconnect(receive))
        except ClientGone:
            return Response(status_code=499)  # nobody is listening; for the access log only
        return json_response(response_body(result, encoding, base_url))

    async def handle_infer(scope: Scope, receive: Receive, send: Send, model_id: str, identity: Identity) -> None:
        trace = incoming(*_trace_headers(scope))
        token = set_current(trace)
        try:
            response = await infer(scope, receive, model_id, trace, identity)
        except ModelMoraError as exc:
            response = error_response(exc)
        except Exception as exc:
            response = unexpected(scope.get("path", ""), exc, trace.trace_id)
        finally:
            reset_current(token)
        response.raw_headers.append((b"traceparent", trace.traceparent.encode()))
        await response(scope, receive, send)

    async def metrics_text(request: HTTPRequest) -> Response:
        """Prometheus metrics, in the format the scraper accepts."""
        body, media_type = metrics.exposition(request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": media_type})

    async def list_models(request: HTTPRequest) -> Response:
        """GET: the registry, by id: `?task_type=` filters, `?limit=&offset=` pages (`total` counts
        all); POST: register a model version from a source, in the background (202 + the operation)."""
        if request.method == "POST":
            body = decode(_register_decoder, await read_body(request.scope, request.receive, limit, body_timeout_s))
            call = RegisterCall(
                body.source,
                body.id,
                None if body.task_type is None else str(body.task_type),
                body.version,
                body.force,
                body.activate,
                None if body.metadata is None else msgspec.to_builtins(body.metadata),
                body.settings,
                body.check,
            )
            with audited("register", _identity_of(request), model=body.id, source=body.source, version=body.version):
                return _accepted(await service.admin.register(call))
        count = _query_int(request, "limit", MAX_PAGE, MAX_PAGE)
        offset = _query_int(request, "offset", 0, 2**31)
        recs = await service.models(request.query_params.get("task_type"))
        page = recs[offset : offset + count]
        return json_response(ModelList([_model_info(r) for r in page], len(recs)))

    async def model(request: HTTPRequest) -> Response:
        """GET: one model; PUT: replace its settings (fields left out take the server's defaults);
        DELETE: remove it and its files (`?force=true`: unload a loaded one first)."""
        model_id = request.path_params["model_id"]
        if request.method == "PUT":
            update = decode(_settings_decoder, await read_body(request.scope, request.receive, limit, body_timeout_s))
            rec = await service.update_settings(model_id, update, identity=_identity_of(request))
            return json_response(_model_info(rec))
        if request.method == "DELETE":
            await no_body(request)
            with audited("delete", _identity_of(request), model=model_id):
                rec = await service.admin.delete(model_id, force=_query_flag(request, "force"))
            return json_response(_model_info(rec))
        return json_response(_model_info(await service.model(model_id)))

    async def download_model(request: HTTPRequest) -> Response:
        """Fetch a version's files again from its source at its recorded revision (background)."""
        body = await read_body(request.scope, request.receive, limit, body_timeout_s, optional=True)
        version = decode(_download_decoder, body).version if body else None
        model_id = request.path_params["model_id"]
        with audited("download", _identity_of(request), model=model_id, version=version):
            return _accepted(await service.admin.download(model_id, version))

    async def operation(request: HTTPRequest) -> Response:
        return json_response(service.admin.operations.get(request.path_params["operation_id"]))

    async def model_metadata(request: HTTPRequest) -> Response:
        """Replace a model's metadata (validated for its task; 422 naming the field)."""
        model_id = request.path_params["model_id"]
        body = decode(_metadata_decoder, await read_body(request.scope, request.receive, limit, body_timeout_s))
        with audited("update_metadata", _identity_of(request), model=model_id):
            return json_response(_model_info(await service.admin.update_metadata(model_id, body)))

    async def model_version(request: HTTPRequest) -> Response:
        """POST: make the version the active one (`{"pin": true|false}` optional); DELETE: remove that
        version (not the active one) and its files."""
        model_id, version = request.path_params["model_id"], request.path_params["version"]
        if request.method == "DELETE":
            await no_body(request)
            with audited("delete", _identity_of(request), model=model_id, version=version):
                rec = await service.admin.delete(model_id, version, force=_query_flag(request, "force"))
            return json_response(_model_info(rec))
        body = await read_body(request.scope, request.receive, limit, body_timeout_s, optional=True)
        pin = decode(_activate_decoder, body).pin if body else None
        with audited("activate", _identity_of(request), model=model_id, version=version, pin=pin):
            return json_response(_model_info(await service.admin.activate(model_id, version, pin=pin)))

    async def no_body(request: HTTPRequest) -> None:
        """Load and unload take no body: none (then no Content-Type is needed), or a JSON `{}`."""
        body = await read_body(request.scope, request.receive, limit, body_timeout_s, optional=True)
        if body:
            decode(_empty_decoder, body)

    async def load_model(request: HTTPRequest) -> Response:
        """Load (and warm up) a model now; waits until it is ready."""
        await no_body(request)
        model_id, version = request.path_params["model_id"], request.query_params.get("version")
        return json_response(await service.load(model_id, version, identity=_identity_of(request)))

    async def unload_model(request: HTTPRequest) -> Response:
        """Drain the model's queue, stop its worker, give its memory back."""
        await no_body(request)
        model_id, version = request.path_params["model_id"], request.query_params.get("version")
        return json_response(await service.unload(model_id, version, identity=_identity_of(request)))

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
        Route("/api/v1/models", list_models, methods=["GET", "POST"]),
        Route("/api/v1/models/{model_id}/download", download_model, methods=["POST"]),
        Route("/api/v1/operations/{operation_id}", operation, methods=["GET"]),
        Route("/api/v1/models/{model_id}", model, methods=["GET", "PUT", "DELETE"]),  # one route: 405 lists all
        Route("/api/v1/models/{model_id}/metadata", model_metadata, methods=["PUT"]),
        Route("/api/v1/models/{model_id}/versions/{version}", model_version, methods=["POST", "DELETE"]),
        Route("/api/v1/models/{model_id}/load", load_model, methods=["POST"]),
        Route("/api/v1/models/{model_id}/unload", unload_model, methods=["POST"]),
        Route("/api/v1/status", status, methods=["GET"]),
        Route("/api/v1/metrics", metrics_text, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/health/models", health_models, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Mount("/docs/assets", app=StaticFiles(directory=openapi.swagger_assets_dir()), name="docs-assets"),
    ]
    if isinstance(service.results, FilesystemResultStore):
        routes.append(result_route(service.results))
    if jobs is not None:
        routes.extend(job_routes(jobs, limit, body_timeout_s, public_url, _base_url))
    app = Starlette(routes=routes, exception_handlers=exception_handlers)
    gate = gate if gate is not None else Gate(settings.auth)
    access = RestAccess(metrics_open=settings.auth.metrics_open)
    protocols = {openai.PREFIX: openai.create_openai_app(service), oip.PREFIX: oip.create_oip_app(service)}
    return _Api(app, handle_infer, Cors.from_origins(settings.cors_origins), gate, access, protocols)


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
    """The ASGI entry point: CORS first (when configured; a preflight carries no credentials), then
    the gate (token, scope and limits, before any body is read), then `POST /api/v1/infer/{model_id}`
    is served directly, and so is every path of a drop-in protocol (`/v1/`, `/v2`); everything
    else goes to Starlette."""

    def __init__(
        self,
        app: Starlette,
        infer: Callable[[Scope, Receive, Send, str, Identity], Awaitable[None]],
        cors: Cors | None,
        gate: Gate,
        access: RestAccess,
        protocols: dict[str, ASGIApp] | None = None,
    ) -> None:
        self.app = app
        self.infer = infer
        self.cors = cors
        self.gate = gate
        self.access = access
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
        model_id = None
        if scope["method"] == "POST" and scope["path"].startswith(_INFER_PREFIX):
            model_id = scope["path"][len(_INFER_PREFIX) :]
            if not model_id or "/" in model_id:
                model_id = None
        if not self.gate.enabled:  # every caller is anonymous: nothing to check or give back
            if model_id is not None:
                await self.infer(scope, receive, send, model_id, ANONYMOUS)
            else:
                await self._route(scope, receive, send)
            return
        permit = await self._admit(scope, receive, send, model_id)
        if permit is None:
            return
        try:
            if model_id is not None:
                await self.infer(scope, receive, send, model_id, permit.identity)
            else:
                scope[_IDENTITY_KEY] = permit.identity
                await self._route(scope, receive, send)
        finally:
            permit.release()

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A drop-in protocol's path to its front end; anything else to Starlette."""
        for prefix, protocol in self.protocols.items():
            if scope["path"].startswith(prefix):
                await protocol(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _admit(self, scope: Scope, receive: Receive, send: Send, model_id: str | None) -> Permit | None:
        """The request's permit, or None once it has been refused (401, 403, 429)."""
        access = AuthScope.INFER if model_id is not None else self.access(scope["method"], scope["path"])
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            return self.gate.admit(access, authorization)
        except ModelMoraError as exc:
            await error_response(exc)(scope, receive, send)
            return None


def _trace_headers(scope: Scope) -> tuple[str | None, str | None]:
    """The request's W3C `traceparent` and `tracestate` headers (None where absent)."""
    parent = state = None
    for name, value in scope["headers"]:
        if len(name) == 11 and name.lower() == b"traceparent":
            parent = value.decode("latin-1")
        elif len(name) == 10 and name.lower() == b"tracestate":
            state = value.decode("latin-1")
    return parent, state


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
