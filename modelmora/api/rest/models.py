"""REST endpoints of the registry and the runtime's models: list and register models, read one,
replace its settings or metadata, delete it, activate or delete a version, fetch a version's files
again, follow a background operation, load and unload. Admin actions are audited with the caller's
identity (here, or in the core where it does the work)."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import Route

from ...config import ModelSettings
from ...errors import InvalidInput
from ...registry import ModelRecord, semver_key
from ...security import Identity, audited
from ...service import InferenceService, Operation, RegisterCall
from ..schemas import ActivateVersion, DownloadVersion, ModelInfo, ModelList, ModelVersionInfo, RegisterModel
from .body import decode, read_body
from .edge import identity_of
from .errors import json_response

__all__ = ("MAX_PAGE", "model_routes")

MAX_PAGE = 1000
"""`GET /api/v1/models?limit=` at most (and by default)."""


class _Empty(msgspec.Struct, forbid_unknown_fields=True):
    """The body of load and unload, when one is sent: `{}`."""


_settings_decoder = msgspec.json.Decoder(ModelSettings)
_empty_decoder = msgspec.json.Decoder(_Empty)
_activate_decoder = msgspec.json.Decoder(ActivateVersion)
_register_decoder = msgspec.json.Decoder(RegisterModel)
_download_decoder = msgspec.json.Decoder(DownloadVersion)
_metadata_decoder = msgspec.json.Decoder(dict[str, Any])


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


def _caller(request: HTTPRequest) -> Identity:
    return identity_of(request.scope)


def model_routes(service: InferenceService, limit: int, body_timeout_s: float) -> list[Route]:
    """The models endpoints over `service` (`limit`, `body_timeout_s`: the request body's bounds)."""

    async def body_of(request: HTTPRequest, *, optional: bool = False) -> bytes:
        return await read_body(request.scope, request.receive, limit, body_timeout_s, optional=optional)

    async def list_models(request: HTTPRequest) -> Response:
        """GET: the registry, by id: `?task_type=` filters, `?limit=&offset=` pages (`total` counts
        all); POST: register a model version from a source, in the background (202 + the operation)."""
        if request.method == "POST":
            body = decode(_register_decoder, await body_of(request))
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
            with audited("register", _caller(request), model=body.id, source=body.source, version=body.version):
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
            update = decode(_settings_decoder, await body_of(request))
            rec = await service.update_settings(model_id, update, identity=_caller(request))
            return json_response(_model_info(rec))
        if request.method == "DELETE":
            await no_body(request)
            with audited("delete", _caller(request), model=model_id):
                rec = await service.admin.delete(model_id, force=_query_flag(request, "force"))
            return json_response(_model_info(rec))
        return json_response(_model_info(await service.model(model_id)))

    async def download_model(request: HTTPRequest) -> Response:
        """Fetch a version's files again from its source at its recorded revision (background)."""
        body = await body_of(request, optional=True)
        version = decode(_download_decoder, body).version if body else None
        model_id = request.path_params["model_id"]
        with audited("download", _caller(request), model=model_id, version=version):
            return _accepted(await service.admin.download(model_id, version))

    async def operation(request: HTTPRequest) -> Response:
        return json_response(service.admin.operations.get(request.path_params["operation_id"]))

    async def model_metadata(request: HTTPRequest) -> Response:
        """Replace a model's metadata (validated for its task; 422 naming the field)."""
        model_id = request.path_params["model_id"]
        body = decode(_metadata_decoder, await body_of(request))
        with audited("update_metadata", _caller(request), model=model_id):
            return json_response(_model_info(await service.admin.update_metadata(model_id, body)))

    async def model_version(request: HTTPRequest) -> Response:
        """POST: make the version the active one (`{"pin": true|false}` optional); DELETE: remove that
        version (not the active one) and its files."""
        model_id, version = request.path_params["model_id"], request.path_params["version"]
        if request.method == "DELETE":
            await no_body(request)
            with audited("delete", _caller(request), model=model_id, version=version):
                rec = await service.admin.delete(model_id, version, force=_query_flag(request, "force"))
            return json_response(_model_info(rec))
        body = await body_of(request, optional=True)
        pin = decode(_activate_decoder, body).pin if body else None
        with audited("activate", _caller(request), model=model_id, version=version, pin=pin):
            return json_response(_model_info(await service.admin.activate(model_id, version, pin=pin)))

    async def no_body(request: HTTPRequest) -> None:
        """Load and unload take no body: none (then no Content-Type is needed), or a JSON `{}`."""
        body = await body_of(request, optional=True)
        if body:
            decode(_empty_decoder, body)

    async def load_model(request: HTTPRequest) -> Response:
        """Load (and warm up) a model now; waits until it is ready."""
        await no_body(request)
        model_id, version = request.path_params["model_id"], request.query_params.get("version")
        return json_response(await service.load(model_id, version, identity=_caller(request)))

    async def unload_model(request: HTTPRequest) -> Response:
        """Drain the model's queue, stop its worker, give its memory back."""
        await no_body(request)
        model_id, version = request.path_params["model_id"], request.query_params.get("version")
        return json_response(await service.unload(model_id, version, identity=_caller(request)))

    return [
        Route("/api/v1/models", list_models, methods=["GET", "POST"]),
        Route("/api/v1/models/{model_id}/download", download_model, methods=["POST"]),
        Route("/api/v1/operations/{operation_id}", operation, methods=["GET"]),
        Route("/api/v1/models/{model_id}", model, methods=["GET", "PUT", "DELETE"]),  # one route: 405 lists all
        Route("/api/v1/models/{model_id}/metadata", model_metadata, methods=["PUT"]),
        Route("/api/v1/models/{model_id}/versions/{version}", model_version, methods=["POST", "DELETE"]),
        Route("/api/v1/models/{model_id}/load", load_model, methods=["POST"]),
        Route("/api/v1/models/{model_id}/unload", unload_model, methods=["POST"]),
    ]
