"""REST API (Starlette): decode with msgspec, submit to the scheduler, encode the result.

Errors are translated in one place (`_error_response`); internal exception text never
reaches a client: unexpected errors are logged with a trace id and answered with 500.
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import msgspec
import psutil
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import ModelSettings, Settings
from ..errors import (
    DeadlineExceeded,
    InsufficientMemory,
    InvalidInput,
    MalformedRequest,
    ModelMoraError,
    ModelNotFound,
    ModelUnavailable,
    PayloadTooLarge,
)
from ..images import ImageLimits
from ..lifecycle import ModelState
from ..registry import ModelRecord, ModelStore
from ..results import FilesystemResultStore, ResultStore, result_route
from ..scheduler import ModelKey, ModelRuntime, Priority, Request, Scheduler
from . import openapi
from .schemas import (
    ErrorBody,
    ErrorDetail,
    HealthModel,
    HealthModels,
    InferRequest,
    ModelInfo,
    ModelList,
    ModelVersionInfo,
    Timing,
)
from .tasks import TASKS, Context, Prepared, Task, split_validation

__all__ = ("create_app",)

log = structlog.get_logger("modelmora.api")
T = TypeVar("T")

_envelope_decoder = msgspec.json.Decoder(InferRequest)
_settings_decoder = msgspec.json.Decoder(ModelSettings)
_encoder = msgspec.json.Encoder()
_CATALOG_TTL_S = 1.0


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(obj), status_code=status, media_type="application/json", headers=headers)


def _decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode a JSON body: 400 when it is not JSON, 422 naming the field when a value is wrong."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, field = split_validation(exc, "$", decoder.type)
        raise InvalidInput(message, field=field) from None
    except msgspec.DecodeError:
        raise MalformedRequest("request body is not valid JSON") from None


def _model_info(rec: ModelRecord) -> ModelInfo:
    return ModelInfo(
        rec.id,
        rec.task,
        rec.source,
        rec.active_version,
        [ModelVersionInfo(v.version, v.revision, v.size_bytes, len(v.files), v.created_at) for v in rec.versions],
        msgspec.convert(rec.settings, ModelSettings),
    )


class _Catalog:
    """Registry lookups with a short cache, so a model installed while we run is found at once."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._cache: dict[str, tuple[float, ModelRecord, ModelSettings]] = {}
        self._refreshing: set[str] = set()

    async def get(self, model_id: str) -> tuple[ModelRecord, ModelSettings]:
        """The model's record and its parsed settings (the same settings object while unchanged).

        An expired entry is refreshed by one caller while the others keep using it (one
        registry read per model per TTL, however many requests arrive meanwhile).
        """
        hit = self._cache.get(model_id)
        now = time.monotonic()
        if hit is not None and (now - hit[0] < _CATALOG_TTL_S or model_id in self._refreshing):
            return hit[1], hit[2]
        self._refreshing.add(model_id)
        try:
            rec = await self.store.aget(model_id)
        finally:
            self._refreshing.discard(model_id)
        if rec is None:
            self._cache.pop(model_id, None)
            raise ModelNotFound(f"model {model_id!r} is not installed")
        if hit is not None and hit[1].settings == rec.settings:
            parsed = hit[2]
        else:
            parsed = msgspec.convert(rec.settings, ModelSettings)
        self._cache[model_id] = (now, rec, parsed)
        return rec, parsed

    def forget(self, model_id: str) -> None:
        self._cache.pop(model_id, None)


def create_app(
    settings: Settings, store: ModelStore, scheduler: Scheduler, results: ResultStore | None = None
) -> ASGIApp:
    """Build the ASGI application over a registry store, a running scheduler and a result store.

    `results` None keeps generated images inline (base64); a filesystem store also serves
    its signed URLs here.
    """
    catalog = _Catalog(store)
    limits = ImageLimits.from_settings(settings)
    public_url = settings.public_url.rstrip("/") + "/" if settings.public_url else ""
    started = time.time()

    async def infer(scope: Scope, receive: Receive, model_id: str) -> Response:
        t0 = time.perf_counter()
        start = anyio.current_time()
        env = _decode(_envelope_decoder, await _read_asgi_body(scope, receive, settings.max_body_bytes))
        rec, model_settings = await catalog.get(model_id)
        version = env.version or rec.active_version
        vrec = rec.version_record(version)
        if vrec is None:
            raise ModelNotFound(f"model {model_id!r} has no version {version!r}", field="$.version")
        task = TASKS.get(rec.task)
        if task is None:
            raise ModelUnavailable(f"task type {rec.task!r} of model {model_id!r} is not served")
        ctx = Context(settings, limits, results, public_url or _base_url(scope))
        prepared = await task.prepare(env, ctx)
        timeout_s = env.timeout_seconds or getattr(settings.timeout_s, rec.task)
        key = ModelKey(rec.id, version)
        rt = scheduler.runtime(
            key, task=rec.task, path=vrec.path, settings=model_settings, weights_bytes=vrec.size_bytes
        )
        req = Request(key, prepared.inputs, prepared.params, Priority.parse(env.priority), start + timeout_s)
        answer = _Answer(rec.id, version, task, prepared, ctx, req, t0)
        if env.stream:
            return await _stream(scheduler, rt, req, answer, timeout_s)
        scheduler.submit(rt, req)
        gone = False
        try:
            # wait for the client to go away; the request's completion (or its deadline) ends the wait
            with anyio.CancelScope(deadline=req.deadline) as waiting:
                req.waiter = waiting
                if not req.done.is_set():
                    gone = await _until_disconnect(receive)
        finally:
            req.waiter = None
            if not req.done.is_set():
                scheduler.withdraw(rt, req)  # deadline, disconnect or shutdown: it leaves the queue now
        if not req.done.is_set():
            if gone:
                return Response(status_code=499)  # nobody is listening; for the access log only
            raise _not_done_error(rt, timeout_s)
        return _json(await answer.body())

    async def handle_infer(scope: Scope, receive: Receive, send: Send, model_id: str) -> None:
        """`POST /api/v1/infer/{model_id}` straight from ASGI: the hot path skips Starlette's layers."""
        try:
            response = await infer(scope, receive, model_id)
        except ModelMoraError as exc:
            response = _error_response(exc)
        except Exception as exc:
            response = _unexpected(scope.get("path", ""), exc)
        await response(scope, receive, send)

    async def list_models(request: HTTPRequest) -> Response:
        task = request.query_params.get("task_type")
        recs = await store.alist(task)
        return _json(ModelList([_model_info(r) for r in recs]))

    async def get_model(request: HTTPRequest) -> Response:
        model_id = request.path_params["model_id"]
        rec = await store.aget(model_id)
        if rec is None:
            raise ModelNotFound(f"model {model_id!r} is not installed")
        return _json(_model_info(rec))

    async def put_model(request: HTTPRequest) -> Response:
        """Replace a model's settings (fields left out take the server's defaults)."""
        model_id = request.path_params["model_id"]
        update = _decode(
            _settings_decoder, await _read_asgi_body(request.scope, request.receive, settings.max_body_bytes)
        )
        new = await store.aupdate_settings(model_id, msgspec.to_builtins(update))
        if new is None:
            raise ModelNotFound(f"model {model_id!r} is not installed")
        catalog.forget(model_id)
        return _json(_model_info(new))

    async def _runtime_of(request: HTTPRequest) -> ModelRuntime:
        model_id = request.path_params["model_id"]
        rec, model_settings = await catalog.get(model_id)
        version = request.query_params.get("version") or rec.active_version
        vrec = rec.version_record(version)
        if vrec is None:
            raise ModelNotFound(f"model {model_id!r} has no version {version!r}", field="version")
        return scheduler.runtime(
            ModelKey(rec.id, version),
            task=rec.task,
            path=vrec.path,
            settings=model_settings,
            weights_bytes=vrec.size_bytes,
        )

    async def load_model(request: HTTPRequest) -> Response:
        """Load (and warm up) a model now; waits until it is ready."""
        rt = await _runtime_of(request)
        await scheduler.load(rt, settings.worker_start_timeout_s)
        return _json(_runtime_status(rt))

    async def unload_model(request: HTTPRequest) -> Response:
        """Drain the model's queue, stop its worker, give its memory back."""
        rt = await _runtime_of(request)
        await scheduler.unload(rt, settings.unload_grace_s)
        return _json(_runtime_status(rt))

    def _runtime_status(rt: ModelRuntime) -> dict[str, Any]:
        return next(
            s for s in scheduler.status() if s["model_id"] == rt.key.model_id and s["version"] == rt.key.version
        )

    async def status(request: HTTPRequest) -> Response:
        proc = psutil.Process()
        return _json(
            {
                "supervisor": {
                    "pid": os.getpid(),
                    "rss_mb": round(proc.memory_info().rss / 2**20, 1),
                    "uptime_s": round(time.time() - started, 1),
                    "torch_imported": "torch" in sys.modules,
                },
                "zygote": scheduler.launcher.statistics() if scheduler.launcher is not None else None,
                "budget": scheduler.budget_status(),
                "models": scheduler.status(),
            }
        )

    async def live(request: HTTPRequest) -> Response:
        return _json({"status": "ok"})

    async def ready(request: HTTPRequest) -> Response:
        try:
            await store.aping()
        except Exception:
            log.exception("registry_unreachable")
            return _json({"status": "unavailable", "reason": "registry unreachable"}, 503)
        return _json({"status": "ok"})

    async def health_models(request: HTTPRequest) -> Response:
        out = []
        for rt in scheduler.models.values():
            healthy = rt.state != ModelState.FAILED
            out.append(HealthModel(rt.key.model_id, rt.key.version, healthy, str(rt.state), rt.last_error))
        all_ok = all(h.healthy for h in out)
        return _json(HealthModels(out), 200 if all_ok else 503)

    async def openapi_json(request: HTTPRequest) -> Response:
        return Response(openapi.document_bytes(), media_type="application/json")

    async def docs(request: HTTPRequest) -> HTMLResponse:
        return HTMLResponse(openapi.DOCS_HTML)

    async def infer_via_router(request: HTTPRequest) -> Response:  # pragma: no cover - `_Api` serves these
        raise ModelNotFound("no such endpoint")

    routes = [
        # POSTs are served by `_Api` before routing; the route gives other methods their 405
        Route("/api/v1/infer/{model_id}", infer_via_router, methods=["POST"]),
        Route("/api/v1/models", list_models, methods=["GET"]),
        Route("/api/v1/models/{model_id}", get_model, methods=["GET"]),
        Route("/api/v1/models/{model_id}", put_model, methods=["PUT"]),
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
    if isinstance(results, FilesystemResultStore):
        routes.append(result_route(results))
    app = Starlette(
        routes=routes,
        exception_handlers={
            ModelMoraError: _handle_error,
            404: _handle_http_error,
            405: _handle_http_error,
            Exception: _handle_unexpected,
        },
    )
    return _Api(app, handle_infer)


class _Answer:
    """Builds the response body of a finished request."""

    def __init__(
        self, model_id: str, version: str, task: Task, prepared: Prepared, ctx: Context, req: Request, t0: float
    ) -> None:
        self.model_id, self.version, self.task = model_id, version, task
        self.prepared, self.ctx, self.req, self.t0 = prepared, ctx, req, t0

    async def body(self) -> Any:
        req = self.req
        if req.error is not None:
            raise req.error
        output = await self.task.respond(req.result, self.prepared, self.ctx)
        timing = Timing(
            round((req.dispatched_at - req.enqueued_at) * 1e3, 3),
            round((req.finished_at - req.dispatched_at) * 1e3, 3),
            round((time.perf_counter() - self.t0) * 1e3, 3),
        )
        return self.task.response_type(self.model_id, self.version, self.task.name, timing, output)


def _not_done_error(rt: ModelRuntime, timeout_s: float) -> ModelMoraError:
    model_id = rt.key.model_id
    if rt.waiting_for_memory:
        return InsufficientMemory(
            f"model {model_id!r} could not be loaded within {timeout_s:g} s: the memory budget is full"
            " and no loaded model can be evicted",
            retry_after_s=5,
        )
    return DeadlineExceeded(f"model {model_id!r} did not answer within {timeout_s:g} s")


def _sse(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n"


async def _next_event(
    events: MemoryObjectReceiveStream[tuple[str, dict[str, Any]]], done: anyio.Event
) -> tuple[str, dict[str, Any]] | None:
    """The next event of a streaming request, or None once the request is done and drained."""
    try:
        return events.receive_nowait()
    except anyio.WouldBlock:
        pass
    except anyio.EndOfStream:  # pragma: no cover - the sender is never closed
        return None
    if done.is_set():
        return None
    got: tuple[str, dict[str, Any]] | None = None
    async with anyio.create_task_group() as tg:

        async def receive() -> None:
            nonlocal got
            got = await events.receive()
            tg.cancel_scope.cancel()

        async def finish() -> None:
            await done.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(receive)
        tg.start_soon(finish)
    if got is None:
        return await _next_event(events, done)  # done: drain what arrived meanwhile
    return got


async def _stream(scheduler: Scheduler, rt: ModelRuntime, req: Request, answer: _Answer, timeout_s: float) -> Response:
    """Answer with server-sent events: the task's events (token, progress), then result or error."""
    send, receive = anyio.create_memory_object_stream[tuple[str, dict[str, Any]]](math.inf)

    def on_event(item: int, kind: str, data: dict[str, Any]) -> None:
        send.send_nowait((kind, {"index": item, **data} if item >= 0 else data))

    req.on_event = on_event
    scheduler.submit(rt, req)  # queue full / failed model: a plain JSON error, nothing was streamed yet

    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                event = None
                with anyio.CancelScope(deadline=req.deadline):
                    event = await _next_event(receive, req.done)
                if event is None:
                    break  # done, or the deadline passed
                yield _sse(*event)
            if not req.done.is_set():
                raise _not_done_error(rt, timeout_s)
            yield _sse("result", await answer.body())
        except ModelMoraError as exc:
            yield _sse("error", ErrorBody(ErrorDetail(exc.code, exc.message, exc.field)))
        finally:
            if not req.done.is_set():
                scheduler.withdraw(rt, req)  # deadline or disconnect: leave the queue, stop the batch
            send.close()
            receive.close()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _until_disconnect(receive: Receive) -> bool:
    """Wait until the client goes away (the request body has been read); returns True then."""
    while (await receive())["type"] != "http.disconnect":
        pass
    return True


_INFER_PREFIX = "/api/v1/infer/"


class _Api:
    """The ASGI entry point: `POST /api/v1/infer/{model_id}` is served directly (no routing or
    middleware layers on the path every request takes); everything else goes to Starlette."""

    def __init__(self, app: Starlette, infer: Callable[[Scope, Receive, Send, str], Awaitable[None]]) -> None:
        self.app = app
        self.infer = infer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(_INFER_PREFIX):
            model_id = scope["path"][len(_INFER_PREFIX) :]
            if model_id and "/" not in model_id:
                await self.infer(scope, receive, send, model_id)
                return
        await self.app(scope, receive, send)


async def _read_asgi_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(
                f"request body of {int(value)} bytes exceeds the limit of {limit} bytes (max_body_bytes)"
            )
    first = await receive()
    if first["type"] == "http.disconnect":
        raise MalformedRequest("the client went away before sending the whole body")
    body: bytes = first.get("body", b"")
    if not first.get("more_body", False):  # the common case: one message, no copy
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (max_body_bytes)")
        return body
    buf = bytearray(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise MalformedRequest("the client went away before sending the whole body")
        buf += message.get("body", b"")
        if len(buf) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (max_body_bytes)")
        if not message.get("more_body", False):
            return bytes(buf)


def _base_url(scope: Scope) -> str:
    """The server's base URL as the client reached it (scheme, Host header, root path)."""
    host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
    if not host:
        server = scope.get("server") or ("localhost", 80)
        host = f"{server[0]}:{server[1]}"
    return f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}/"


def _error_response(exc: ModelMoraError) -> Response:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return _json(ErrorBody(ErrorDetail(exc.code, exc.message, exc.field)), exc.http_status, headers)


async def _handle_error(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, ModelMoraError)
    return _error_response(exc)


async def _handle_http_error(request: HTTPRequest, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    code = "not_found" if status == 404 else "method_not_allowed"
    msg = "no such endpoint" if status == 404 else f"method {request.method} is not allowed here"
    return _json(ErrorBody(ErrorDetail(code, msg)), status)


def _unexpected(path: str, exc: Exception) -> Response:
    trace_id = uuid.uuid4().hex
    log.error("unhandled_error", trace_id=trace_id, path=path, exc_info=exc)
    return _json(ErrorBody(ErrorDetail("internal_error", f"internal error (trace id {trace_id})")), 500)


async def _handle_unexpected(request: HTTPRequest, exc: Exception) -> Response:
    return _unexpected(request.url.path, exc)
