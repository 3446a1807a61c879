"""The REST front end: a thin adapter that decodes JSON into the core's calls and encodes
its typed results. `POST /api/v1/infer/{model_id}` is served straight from ASGI (`infer`, by the
entry point in `entry`: no routing or middleware layers on the path every request takes), and so are
the drop-in protocols (`/v1/`, `/v2`); everything else goes to Starlette.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from ...jobs import JobRunner
from ...results import FilesystemResultStore, result_route
from ...security import Gate
from ...service import InferenceService
from .. import oip, openai, openapi
from ..access import RestAccess
from ..openai import errors as openai_errors
from .cors import Cors
from .entry import ApiEntry, FrontEnd
from .errors import exception_handlers, json_response
from .infer import base_url, infer_handler
from .jobs import job_routes
from .models import model_routes

__all__ = ("create_app",)


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
    mutual_tls = bool(settings.tls.cert_file and settings.tls.client_ca_file)

    async def metrics_text(request: HTTPRequest) -> Response:
        """Prometheus metrics, in the format the scraper accepts."""
        body, media_type = metrics.exposition(request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": media_type})

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
        return Response(openapi.document_bytes(mutual_tls=mutual_tls), media_type="application/json")

    async def docs(request: HTTPRequest) -> HTMLResponse:
        return HTMLResponse(openapi.DOCS_HTML)

    async def infer_via_router(request: HTTPRequest) -> Response:  # pragma: no cover - `ApiEntry` serves these
        raise AssertionError("served by ApiEntry")

    routes = [
        # POSTs are served by `ApiEntry` before routing; the route gives other methods their 405
        Route("/api/v1/infer/{model_id}", infer_via_router, methods=["POST"]),
        *model_routes(service, limit, body_timeout_s),
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
        routes.extend(job_routes(jobs, limit, body_timeout_s, public_url, base_url))
    app = Starlette(routes=routes, exception_handlers=exception_handlers)
    gate = gate if gate is not None else Gate(settings.auth)
    access = RestAccess(metrics_open=settings.auth.metrics_open)
    front_ends = [
        FrontEnd(openai.PREFIX, openai.create_openai_app(service), openai_errors.error_response),
        FrontEnd(oip.PREFIX, oip.create_oip_app(service), oip.error_response),
    ]
    return ApiEntry(app, infer_handler(service), Cors.from_origins(settings.cors_origins), gate, access, front_ends)
