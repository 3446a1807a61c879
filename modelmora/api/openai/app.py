"""The OpenAI-compatible front end: `/v1/...` served straight from ASGI (a table of paths, no
routing layers), each endpoint a thin adapter over `modelmora.service`, errors in OpenAI's shape
(`errors`).

    POST /v1/embeddings             txt2embed, img2embed
    POST /v1/completions            txt2txt
    POST /v1/chat/completions       txt2txt with a chat template
    POST /v1/images/generations     txt2img
    GET  /v1/models, /v1/models/{id}
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ...errors import ClientGone, ModelMoraError
from ...registry import ModelRecord
from ...service import InferenceService
from ..rest.edge import trace_of
from ..rest.errors import EndpointNotFound, MethodNotAllowed
from .completions import Completions
from .embeddings import embeddings
from .errors import error_response, unexpected
from .images import generate_images
from .schemas import ModelObject, ModelsResponse

__all__ = ("PREFIX", "create_openai_app")

PREFIX = "/v1/"
_MODELS = "/v1/models/"
_encoder = msgspec.json.Encoder()

Handler = Callable[[Scope, Receive], Awaitable[ASGIApp]]


def _model_object(rec: ModelRecord) -> ModelObject:
    return ModelObject(rec.id, int(rec.created_at), "modelmora", rec.task)


def _json(obj: object) -> Response:
    return Response(_encoder.encode(obj), media_type="application/json")


def _base_url(scope: Scope, public_url: str) -> str:
    """Where result URLs point: `public_url`, else the connection's own address (never the client's
    Host header)."""
    if public_url:
        return public_url
    host, port = scope.get("server") or ("127.0.0.1", 80)
    host = f"[{host}]" if ":" in host else host
    scheme = scope.get("scheme", "http")
    netloc = host if port in (None, 443 if scheme == "https" else 80) else f"{host}:{port}"
    return f"{scheme}://{netloc}{scope.get('root_path', '')}/"


def create_openai_app(service: InferenceService) -> ASGIApp:
    """The ASGI application for paths under `/v1/`."""
    completions = Completions(service)
    public_url = service.settings.public_url.rstrip("/") + "/" if service.settings.public_url else ""

    async def post_embeddings(scope: Scope, receive: Receive) -> ASGIApp:
        return await embeddings(service, scope, receive)

    async def post_completions(scope: Scope, receive: Receive) -> ASGIApp:
        return await completions.completions(scope, receive)

    async def post_chat(scope: Scope, receive: Receive) -> ASGIApp:
        return await completions.chat(scope, receive)

    async def post_images(scope: Scope, receive: Receive) -> ASGIApp:
        return await generate_images(service, scope, receive, _base_url(scope, public_url))

    async def list_models(scope: Scope, receive: Receive) -> ASGIApp:
        return _json(ModelsResponse([_model_object(r) for r in await service.models()]))

    routes: dict[str, tuple[str, Handler]] = {
        "/v1/embeddings": ("POST", post_embeddings),
        "/v1/completions": ("POST", post_completions),
        "/v1/chat/completions": ("POST", post_chat),
        "/v1/images/generations": ("POST", post_images),
        "/v1/models": ("GET", list_models),
    }

    async def route(scope: Scope, receive: Receive) -> ASGIApp:
        path, method = scope["path"], scope["method"]
        found = routes.get(path)
        if found is None and path.startswith(_MODELS) and "/" not in path[len(_MODELS) :]:
            model_id = path[len(_MODELS) :]

            async def one_model(scope: Scope, receive: Receive) -> ASGIApp:
                return _json(_model_object(await service.model(model_id)))

            found = ("GET", one_model)
        if found is None:
            raise EndpointNotFound(f"no such endpoint: {method} {path}")
        allowed, handler = found
        if method != allowed:
            raise MethodNotAllowed(f"method {method} is not allowed here", allow=allowed)
        return await handler(scope, receive)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await route(scope, receive)
        except ClientGone:
            response = Response(status_code=499)  # nobody is listening; for the access log only
        except ModelMoraError as exc:
            response = error_response(exc)
        except Exception as exc:
            response = unexpected(scope.get("path", ""), exc, trace_of(scope).trace_id)
        await response(scope, receive, send)

    return app
