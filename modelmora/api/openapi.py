"""OpenAPI 3.1 document generated from the msgspec types that validate requests, and the
offline Swagger UI page (Swagger UI 5, which reads OpenAPI 3.1; its assets come from the
`swagger-ui-bundle-v2` package and are served by the server itself)."""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path
from typing import Any

import msgspec

from .. import __version__
from ..config import ModelSettings
from ..service import ModelStatus, Operation, ServerStatus
from .job_schemas import job_paths, job_types
from .schemas import (
    ActivateVersion,
    CaptionParameters,
    DownloadVersion,
    EmbeddingParameters,
    EmbeddingResponse,
    ErrorBody,
    GenerationParameters,
    HealthModels,
    ImageGenerationParameters,
    ImageInput,
    ImageResponse,
    InferRequest,
    ModelInfo,
    ModelList,
    RegisterModel,
    TextInput,
    TextResponse,
)

__all__ = ("DOCS_HTML", "document", "document_bytes", "swagger_assets_dir")

_REF = "#/components/schemas/{name}"


def swagger_assets_dir() -> str:
    """The folder holding Swagger UI 5's dist files (swagger-ui-bundle.js, swagger-ui.css, favicons)."""
    import swagger_ui_bundle

    return str(Path(str(swagger_ui_bundle.swagger_ui_path)))


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(name="ErrorBody")}}},
    }


def _ok(name: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}}


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document (built once)."""
    inputs = [TextInput, ImageInput]
    parameters = [EmbeddingParameters, CaptionParameters, GenerationParameters, ImageGenerationParameters]
    responses = [EmbeddingResponse, TextResponse, ImageResponse]
    types = [
        InferRequest,
        ErrorBody,
        ModelInfo,
        ModelList,
        HealthModels,
        ModelSettings,
        ActivateVersion,
        RegisterModel,
        DownloadVersion,
        Operation,
        ServerStatus,
        ModelStatus,
        *inputs,
        *parameters,
        *responses,
        *job_types(),
    ]
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    req = components["InferRequest"]
    req["properties"]["input_data"] = {
        "description": "Task inputs: TextInput for txt2embed, txt2txt and txt2img; ImageInput for img2embed and"
        " img2txt.",
        "oneOf": [{"$ref": _REF.format(name=t.__name__)} for t in inputs],
    }
    priority = req["properties"]["priority"]
    # validated as a number that is a multiple of 1 (3 and 3.0 alike): JSON Schema's "integer" says that
    priority["anyOf"][0] = {"type": "integer", "minimum": 1, "maximum": 4}
    req["properties"]["parameters"] = {
        "description": "Task parameters: EmbeddingParameters (txt2embed, img2embed), CaptionParameters (img2txt),"
        " GenerationParameters (txt2txt), ImageGenerationParameters (txt2img).",
        "oneOf": [{"$ref": _REF.format(name=t.__name__)} for t in parameters],
        "default": {},
    }
    components["InferResponse"] = {
        "description": "The response of the model's task type. With `stream: true` (txt2txt, txt2img) the answer is"
        " text/event-stream: `token` events ({index, text}) or `progress` events ({step, steps}), then one `result`"
        " event holding this object, or one `error` event holding an ErrorBody.",
        "oneOf": [{"$ref": _REF.format(name=t.__name__)} for t in responses],
    }
    model_id = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    force = {
        "name": "force",
        "in": "query",
        "required": False,
        "description": "Unload a loaded model first (its queued requests are served), then remove it",
        "schema": {"type": "boolean", "default": False},
    }
    errors = {
        "400": _error("Malformed JSON, not UTF-8, or nested deeper than 64 levels"),
        "404": _error("Unknown model or version"),
        "408": _error("Body not received within body_read_timeout_s"),
        "413": _error("Body over max_body_bytes"),
        "415": _error("Content-Type is not application/json"),
        "422": _error("Invalid field; error.field names it"),
        "429": _error("Model queue full (Retry-After)"),
        "503": _error("Worker crashed, model failed to load, or unavailable (Retry-After)"),
        "504": _error("Deadline passed"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ModelMora",
            "version": __version__,
            "description": "Multi-model inference server for PyTorch / Hugging Face models.",
        },
        "paths": {
            "/api/v1/infer/{model_id}": {
                "post": {
                    "summary": "Run inference on a model",
                    "operationId": "infer",
                    "parameters": [model_id],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": _REF.format(name="InferRequest")}}},
                    },
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {
                                "application/json": {"schema": {"$ref": _REF.format(name="InferResponse")}},
                                "text/event-stream": {"schema": {"type": "string"}},
                            },
                        },
                        **errors,
                    },
                }
            },
            "/api/v1/results/{name}": {
                "get": {
                    "summary": "A stored result (generated image) at its signed URL",
                    "operationId": "getResult",
                    "parameters": [
                        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "expires", "in": "query", "required": True, "schema": {"type": "integer"}},
                        {"name": "sig", "in": "query", "required": True, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "The stored bytes", "content": {"image/png": {}}},
                        "403": _error("Signature does not match, or the URL expired"),
                        "404": _error("No such result (swept after expiry)"),
                    },
                }
            },
            "/api/v1/models": {
                "get": {
                    "summary": "Installed models (the registry), by id",
                    "operationId": "listModels",
                    "parameters": [
                        {"name": "task_type", "in": "query", "required": False, "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 1000},
                        },
                        {
                            "name": "offset",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 0, "default": 0},
                        },
                    ],
                    "responses": {"200": _ok("ModelList"), "422": _error("Unknown task type, bad limit or offset")},
                },
                "post": {
                    "summary": "Register a model version from a source (http(s) archive or file, s3, Hugging Face,"
                    " catalog id); checked at once, installed in the background",
                    "operationId": "registerModel",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": _REF.format(name="RegisterModel")}}},
                    },
                    "responses": {
                        "202": _ok("Operation", "Started: poll the operation (Location header)"),
                        "409": _error("This version is already installed (force to reinstall)"),
                        "422": _error("Invalid field, a local path, or a private address; error.field names it"),
                        "503": _error("Background operations are not accepted now"),
                    },
                },
            },
            "/api/v1/models/{model_id}/download": {
                "post": {
                    "summary": "Fetch a version's files again from its source at its recorded revision; they must"
                    " match the recorded checksums (background)",
                    "operationId": "downloadModel",
                    "parameters": [model_id],
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": {"$ref": _REF.format(name="DownloadVersion")}}},
                    },
                    "responses": {
                        "202": _ok("Operation", "Started: poll the operation (Location header)"),
                        "404": _error("Unknown model or version"),
                        "422": _error("A local source"),
                    },
                }
            },
            "/api/v1/operations/{operation_id}": {
                "get": {
                    "summary": "A background operation: status (pending, running, succeeded, failed), bytes, error",
                    "operationId": "getOperation",
                    "parameters": [
                        {"name": "operation_id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": _ok("Operation"),
                        "404": _error("Unknown operation, or ended over an hour ago"),
                    },
                }
            },
            "/api/v1/models/{model_id}": {
                "get": {
                    "summary": "One installed model",
                    "operationId": "getModel",
                    "parameters": [model_id],
                    "responses": {"200": _ok("ModelInfo"), "404": _error("Unknown model")},
                },
                "put": {
                    "summary": "Replace a model's settings (left-out fields take the server defaults)",
                    "operationId": "putModelSettings",
                    "parameters": [model_id],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": _REF.format(name="ModelSettings")}}},
                    },
                    "responses": {
                        "200": _ok("ModelInfo"),
                        "400": _error("Malformed JSON"),
                        "404": _error("Unknown model"),
                        "415": _error("Content-Type is not application/json"),
                        "422": _error("Invalid setting, or a key given twice"),
                        "503": _error("The registry cannot be written (storage_unavailable)"),
                    },
                },
                "delete": {
                    "summary": "Remove the model, all its versions and their files",
                    "operationId": "deleteModel",
                    "parameters": [model_id, force],
                    "responses": {
                        "200": _ok("ModelInfo", "The model as it was"),
                        "404": _error("Unknown model"),
                        "409": _error("Loaded, and force is not set"),
                    },
                },
            },
            "/api/v1/models/{model_id}/metadata": {
                "put": {
                    "summary": "Replace a model's metadata (validated for its task)",
                    "operationId": "putModelMetadata",
                    "parameters": [model_id],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": _REF.format(name="ModelMetadata")}}},
                    },
                    "responses": {
                        "200": _ok("ModelInfo"),
                        "404": _error("Unknown model"),
                        "422": _error("Invalid field; error.field names it"),
                    },
                }
            },
            "/api/v1/models/{model_id}/versions/{version}": {
                "post": {
                    "summary": "Make the version the active one: new requests go to it, the previous version's"
                    " worker finishes what it holds and stops",
                    "operationId": "activateVersion",
                    "parameters": [model_id, version],
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": {"$ref": _REF.format(name="ActivateVersion")}}},
                    },
                    "responses": {"200": _ok("ModelInfo"), "404": _error("Unknown model or version")},
                },
                "delete": {
                    "summary": "Remove one version (not the active one) and its files",
                    "operationId": "deleteVersion",
                    "parameters": [model_id, version, force],
                    "responses": {
                        "200": _ok("ModelInfo", "The model as it is now"),
                        "404": _error("Unknown model or version"),
                        "409": _error("The active version, or loaded (without force)"),
                    },
                },
            },
            "/api/v1/models/{model_id}/load": {
                "post": {
                    "summary": "Load the model and run its test inference (warm-up); waits until ready",
                    "operationId": "loadModel",
                    "parameters": [model_id],
                    "responses": {
                        "200": _ok("ModelStatus", "Ready: the model's runtime status"),
                        "404": _error("Unknown model or version"),
                        "503": _error("Load or test inference failed, or insufficient memory"),
                    },
                }
            },
            "/api/v1/models/{model_id}/unload": {
                "post": {
                    "summary": "Drain the queue (up to unload_grace_s), stop the worker, free its memory",
                    "operationId": "unloadModel",
                    "parameters": [model_id],
                    "responses": {
                        "200": _ok("ModelStatus", "Unloaded: the model's runtime status"),
                        "404": _error("Unknown model"),
                    },
                }
            },
            "/api/v1/status": {
                "get": {
                    "summary": "Runtime status: every registered model, workers, queues, memory budgets",
                    "responses": {"200": _ok("ServerStatus")},
                }
            },
            "/health/live": {"get": {"summary": "The process runs", "responses": {"200": {"description": "OK"}}}},
            "/health/ready": {
                "get": {
                    "summary": "The server accepts requests (registry reachable)",
                    "responses": {"200": {"description": "OK"}, "503": {"description": "Not ready"}},
                }
            },
            "/health/models": {
                "get": {
                    "summary": "Per-model health",
                    "responses": {"200": _ok("HealthModels"), "503": _ok("HealthModels", "Some model is unhealthy")},
                }
            },
            **job_paths(_REF, _error, _ok),
        },
        "components": {"schemas": components},
    }


@functools.cache
def document_bytes() -> bytes:
    return msgspec.json.encode(document())


# The page's only script of its own. Swagger UI's defaults are overridden where they would reach
# another origin: `validatorUrl` (validator.swagger.io) is off.
_DOCS_SCRIPT = """
    window.ui = SwaggerUIBundle({
      url: "/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      validatorUrl: null,
      presets: [SwaggerUIBundle.presets.apis],
    });
  """

# The browser enforces that the page loads and sends nothing beyond this server: everything is
# 'self', the inline script is allowed by its hash only, images may also be data: (the CSS's icons)
# or blob: (binary responses shown by "Try it out").
_DOCS_CSP = "; ".join(
    (
        "default-src 'self'",
        f"script-src 'self' 'sha256-{base64.b64encode(hashlib.sha256(_DOCS_SCRIPT.encode()).digest()).decode()}'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    )
)

DOCS_HTML = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta http-equiv="Content-Security-Policy" content="{_DOCS_CSP}">
  <meta name="referrer" content="no-referrer">
  <title>ModelMora API</title>
  <link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script>{_DOCS_SCRIPT}</script>
</body>
</html>
"""
