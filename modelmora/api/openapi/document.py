"""The OpenAPI 3.1 document, generated from the msgspec types that validate requests: the native
API's paths (`paths`) and the async jobs' (`api.job_schemas`), each operation with its security
requirement and the gate's responses (`security`)."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from ... import __version__
from ...config import ModelSettings
from ...service import ModelStatus, Operation, ServerStatus
from ..job_schemas import job_paths, job_types
from ..schemas import (
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
from .parts import REF, error, ok
from .paths import native_paths
from .security import secure, security_components

__all__ = ("document", "document_bytes")


def _schemas() -> dict[str, Any]:
    """The component schemas: the msgspec types, with the unions of inputs, parameters and responses
    described by task type."""
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
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    req = components["InferRequest"]
    req["properties"]["input_data"] = {
        "description": "Task inputs: TextInput for txt2embed, txt2txt and txt2img; ImageInput for img2embed and"
        " img2txt.",
        "oneOf": [{"$ref": REF.format(name=t.__name__)} for t in inputs],
    }
    priority = req["properties"]["priority"]
    # validated as a number that is a multiple of 1 (3 and 3.0 alike): JSON Schema's "integer" says that
    priority["anyOf"][0] = {"type": "integer", "minimum": 1, "maximum": 4}
    req["properties"]["parameters"] = {
        "description": "Task parameters: EmbeddingParameters (txt2embed, img2embed), CaptionParameters (img2txt),"
        " GenerationParameters (txt2txt), ImageGenerationParameters (txt2img).",
        "oneOf": [{"$ref": REF.format(name=t.__name__)} for t in parameters],
        "default": {},
    }
    components["InferResponse"] = {
        "description": "The response of the model's task type. With `stream: true` (txt2txt, txt2img) the answer is"
        " text/event-stream: `token` events ({index, text}) or `progress` events ({step, steps}), then one `result`"
        " event holding this object, or one `error` event holding an ErrorBody.",
        "oneOf": [{"$ref": REF.format(name=t.__name__)} for t in responses],
    }
    return components


@functools.cache
def document(*, mutual_tls: bool = False) -> dict[str, Any]:
    """The OpenAPI document (built once). `mutual_tls`: the server asks every client for a
    certificate (`[tls] client_ca_file`); the committed `schema/openapi.json` is the document
    without it.

    Raises:
        KeyError: an operation the access table does not name (a bug: caught by the tests).
    """
    paths = {**native_paths(), **job_paths(REF, error, ok)}
    secure(paths, mutual_tls=mutual_tls)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ModelMora",
            "version": __version__,
            "description": "Multi-model inference server for PyTorch / Hugging Face models. With authentication on"
            " (any token configured), each operation needs a bearer token holding the scope its security"
            " requirement names; health probes and these docs stay open.",
        },
        "paths": paths,
        "components": {"schemas": _schemas(), **security_components(mutual_tls=mutual_tls)},
    }


@functools.cache
def document_bytes(*, mutual_tls: bool = False) -> bytes:
    return msgspec.json.encode(document(mutual_tls=mutual_tls))
