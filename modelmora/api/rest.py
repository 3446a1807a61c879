"""REST API (Starlette): decode with msgspec, submit to the scheduler, encode the result.

Errors are translated in one place (`_error_response`); internal exception text never
reaches a client: unexpected errors are logged with a trace id and answered with 500.
"""

from __future__ import annotations

import base64
import os
import sys
import time
import uuid
from typing import Any, TypeVar

import anyio
import msgspec
import psutil
import structlog
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

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
from ..lifecycle import ModelState, TensorData
from ..registry import ModelRecord, ModelStore
from ..scheduler import ModelKey, ModelRuntime, Priority, Request, Scheduler
from . import openapi
from .schemas import (
    EmbeddingOutput,
    EmbeddingParameters,
    ErrorBody,
    ErrorDetail,
    HealthModel,
    HealthModels,
    InferRequest,
    InferResponse,
    ModelInfo,
    ModelList,
    ModelVersionInfo,
    TextInput,
    Timing,
)

__all__ = ("create_app",)

log = structlog.get_logger("modelmora.api")
T = TypeVar("T")

_envelope_decoder = msgspec.json.Decoder(InferRequest)
_settings_decoder = msgspec.json.Decoder(ModelSettings)
_encoder = msgspec.json.Encoder()
_CATALOG_TTL_S = 1.0


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(obj), status_code=status, media_type="application/json", headers=headers)


def _split_validation(exc: msgspec.ValidationError, prefix: str) -> tuple[str, str]:
    text = str(exc)
    message, sep, path = text.rpartition(" - at `")
    if not sep:
        return text, prefix
    path = path.rstrip("`")
    return message, prefix + path[1:] if path.startswith("$") else prefix


def _decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode a JSON body: 400 when it is not JSON, 422 naming the field when a value is wrong."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, field = _split_validation(exc, "$")
        raise InvalidInput(message, field=field) from None
    except msgspec.DecodeError:
        raise MalformedRequest("request body is not valid JSON") from None


def _convert(obj: Any, type_: type[T], prefix: str) -> T:
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as exc:
        message, field = _split_validation(exc, prefix)
        raise InvalidInput(message, field=field) from None


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

    async def get(self, model_id: str) -> tuple[ModelRecord, ModelSettings]:
        """The model's record and its parsed settings (the same settings object while unchanged)."""
        hit = self._cache.get(model_id)
        now = time.monotonic()
        if hit is not None and now - hit[0] < _CATALOG_TTL_S:
            return hit[1], hit[2]
        rec = await self.store.aget(model_id)
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


async def _read_body(request: HTTPRequest, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes (max_body_bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (max_body_bytes)")
    return bytes(body)


def create_app(settings: Settings, store: ModelStore, scheduler: Scheduler) -> Starlette:
    """Build the Starlette application over a registry store and a running scheduler."""
    catalog = _Catalog(store)
    started = time.time()

    async def infer(request: HTTPRequest) -> Response:
        t0 = time.perf_counter()
        start = anyio.current_time()
        model_id = request.path_params["model_id"]
        env = _decode(_envelope_decoder, await _read_body(request, settings.max_body_bytes))
        rec, model_settings = await catalog.get(model_id)
        version = env.version or rec.active_version
        vrec = rec.version_record(version)
        if vrec is None:
            raise ModelNotFound(f"model {model_id!r} has no version {version!r}", field="$.version")
        if rec.task != "txt2embed":
            raise ModelUnavailable(f"task type {rec.task!r} is not served yet (model {model_id!r})")
        inp = _convert(env.input_data, TextInput, "$.input_data")
        params = _convert(env.parameters, EmbeddingParameters, "$.parameters")
        texts = [inp.text] if isinstance(inp.text, str) else inp.text
        if len(texts) > settings.max_texts_per_request:
            raise InvalidInput(
                f"{len(texts)} texts exceed the limit of {settings.max_texts_per_request} per request",
                field="$.input_data.text",
            )
        for i, t in enumerate(texts):
            if len(t) > settings.max_text_chars:
                where = "$.input_data.text" if isinstance(inp.text, str) else f"$.input_data.text[{i}]"
                raise InvalidInput(f"text of {len(t)} characters exceeds {settings.max_text_chars}", field=where)
        timeout_s = env.timeout_seconds or settings.timeout_s.txt2embed
        key = ModelKey(rec.id, version)
        rt = scheduler.runtime(
            key, task=rec.task, path=vrec.path, settings=model_settings, weights_bytes=vrec.size_bytes
        )
        req = Request(key, texts, {"normalize": params.normalize}, Priority.parse(env.priority), start + timeout_s)
        scheduler.submit(rt, req)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_disconnect, request, tg.cancel_scope)
                with anyio.CancelScope(deadline=req.deadline):
                    await req.done.wait()
                tg.cancel_scope.cancel()
        finally:
            if not req.done.is_set():
                scheduler.withdraw(rt, req)  # deadline, disconnect or shutdown: it leaves the queue now
        if not req.done.is_set():
            if _disconnected(request):
                return Response(status_code=499)  # nobody is listening; for the access log only
            if rt.waiting_for_memory:
                raise InsufficientMemory(
                    f"model {model_id!r} could not be loaded within {timeout_s:g} s: the memory budget is full"
                    " and no loaded model can be evicted",
                    retry_after_s=5,
                )
            raise DeadlineExceeded(f"model {model_id!r} did not answer within {timeout_s:g} s")
        if req.error is not None:
            raise req.error
        emb: TensorData = req.result
        rows: list[list[float] | str]
        if params.encoding == "base64":
            rows = [base64.b64encode(b).decode("ascii") for b in emb.row_bytes()]
        else:
            rows = [*emb.rows()]
        end = time.perf_counter()
        timing = Timing(
            round((req.dispatched_at - req.enqueued_at) * 1e3, 3),
            round((req.finished_at - req.dispatched_at) * 1e3, 3),
            round((end - t0) * 1e3, 3),
        )
        return _json(InferResponse(rec.id, version, rec.task, EmbeddingOutput(rows, emb.shape[1]), timing))

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
        update = _decode(_settings_decoder, await _read_body(request, settings.max_body_bytes))
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

    routes = [
        Route("/api/v1/infer/{model_id}", infer, methods=["POST"]),
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
    return Starlette(
        routes=routes,
        exception_handlers={
            ModelMoraError: _handle_error,
            404: _handle_http_error,
            405: _handle_http_error,
            Exception: _handle_unexpected,
        },
    )


async def _watch_disconnect(request: HTTPRequest, scope: anyio.CancelScope) -> None:
    """Cancel `scope` when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            request.state.disconnected = True
            scope.cancel()
            return


def _disconnected(request: HTTPRequest) -> bool:
    return bool(getattr(request.state, "disconnected", False))


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


async def _handle_unexpected(request: HTTPRequest, exc: Exception) -> Response:
    trace_id = uuid.uuid4().hex
    log.error("unhandled_error", trace_id=trace_id, path=request.url.path, exc_info=exc)
    return _json(ErrorBody(ErrorDetail("internal_error", f"internal error (trace id {trace_id})")), 500)
