"""The OpenAPI path items of the native API (the async jobs' come from `api.job_schemas`; the
security requirements and the gate's responses are added to every operation by `security`)."""

from __future__ import annotations

from typing import Any

from .parts import REF, error, ok

__all__ = ("native_paths",)


def native_paths() -> dict[str, Any]:
    """The native API's path items (inference, registry, runtime, health)."""
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
        "400": error("Malformed JSON, not UTF-8, or nested deeper than 64 levels"),
        "404": error("Unknown model or version"),
        "408": error("Body not received within body_read_timeout_s"),
        "413": error("Body over max_body_bytes"),
        "415": error("Content-Type is not application/json"),
        "422": error("Invalid field; error.field names it"),
        "429": error("Model queue full (Retry-After)"),
        "503": error("Worker crashed, model failed to load, or unavailable (Retry-After)"),
        "504": error("Deadline passed"),
    }
    return {
        "/api/v1/infer/{model_id}": {
            "post": {
                "summary": "Run inference on a model",
                "operationId": "infer",
                "parameters": [model_id],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF.format(name="InferRequest")}}},
                },
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {
                            "application/json": {"schema": {"$ref": REF.format(name="InferResponse")}},
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
                    "403": error("Signature does not match, or the URL expired"),
                    "404": error("No such result (swept after expiry)"),
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
                "responses": {"200": ok("ModelList"), "422": error("Unknown task type, bad limit or offset")},
            },
            "post": {
                "summary": "Register a model version from a source (http(s) archive or file, s3, Hugging Face,"
                " catalog id); checked at once, installed in the background",
                "operationId": "registerModel",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF.format(name="RegisterModel")}}},
                },
                "responses": {
                    "202": ok("Operation", "Started: poll the operation (Location header)"),
                    "409": error("This version is already installed (force to reinstall)"),
                    "422": error("Invalid field, a local path, or a private address; error.field names it"),
                    "503": error("Background operations are not accepted now"),
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
                    "content": {"application/json": {"schema": {"$ref": REF.format(name="DownloadVersion")}}},
                },
                "responses": {
                    "202": ok("Operation", "Started: poll the operation (Location header)"),
                    "404": error("Unknown model or version"),
                    "422": error("A local source"),
                },
            }
        },
        "/api/v1/operations/{operation_id}": {
            "get": {
                "summary": "A background operation: status (pending, running, succeeded, failed), bytes, error",
                "operationId": "getOperation",
                "parameters": [{"name": "operation_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": ok("Operation"),
                    "404": error("Unknown operation, or ended over an hour ago"),
                },
            }
        },
        "/api/v1/models/{model_id}": {
            "get": {
                "summary": "One installed model",
                "operationId": "getModel",
                "parameters": [model_id],
                "responses": {"200": ok("ModelInfo"), "404": error("Unknown model")},
            },
            "put": {
                "summary": "Replace a model's settings (left-out fields take the server defaults)",
                "operationId": "putModelSettings",
                "parameters": [model_id],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF.format(name="ModelSettings")}}},
                },
                "responses": {
                    "200": ok("ModelInfo"),
                    "400": error("Malformed JSON"),
                    "404": error("Unknown model"),
                    "415": error("Content-Type is not application/json"),
                    "422": error("Invalid setting, or a key given twice"),
                    "503": error("The registry cannot be written (storage_unavailable)"),
                },
            },
            "delete": {
                "summary": "Remove the model, all its versions and their files",
                "operationId": "deleteModel",
                "parameters": [model_id, force],
                "responses": {
                    "200": ok("ModelInfo", "The model as it was"),
                    "404": error("Unknown model"),
                    "409": error("Loaded, and force is not set"),
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
                    "content": {"application/json": {"schema": {"$ref": REF.format(name="ModelMetadata")}}},
                },
                "responses": {
                    "200": ok("ModelInfo"),
                    "404": error("Unknown model"),
                    "422": error("Invalid field; error.field names it"),
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
                    "content": {"application/json": {"schema": {"$ref": REF.format(name="ActivateVersion")}}},
                },
                "responses": {"200": ok("ModelInfo"), "404": error("Unknown model or version")},
            },
            "delete": {
                "summary": "Remove one version (not the active one) and its files",
                "operationId": "deleteVersion",
                "parameters": [model_id, version, force],
                "responses": {
                    "200": ok("ModelInfo", "The model as it is now"),
                    "404": error("Unknown model or version"),
                    "409": error("The active version, or loaded (without force)"),
                },
            },
        },
        "/api/v1/models/{model_id}/load": {
            "post": {
                "summary": "Load the model and run its test inference (warm-up); waits until ready",
                "operationId": "loadModel",
                "parameters": [model_id],
                "responses": {
                    "200": ok("ModelStatus", "Ready: the model's runtime status"),
                    "404": error("Unknown model or version"),
                    "503": error("Load or test inference failed, or insufficient memory"),
                },
            }
        },
        "/api/v1/models/{model_id}/unload": {
            "post": {
                "summary": "Drain the queue (up to unload_grace_s), stop the worker, free its memory",
                "operationId": "unloadModel",
                "parameters": [model_id],
                "responses": {
                    "200": ok("ModelStatus", "Unloaded: the model's runtime status"),
                    "404": error("Unknown model"),
                },
            }
        },
        "/api/v1/status": {
            "get": {
                "summary": "Runtime status: every registered model, workers, queues, memory budgets",
                "responses": {"200": ok("ServerStatus")},
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
                "responses": {"200": ok("HealthModels"), "503": ok("HealthModels", "Some model is unhealthy")},
            }
        },
    }
