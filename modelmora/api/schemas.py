"""Public request/response types. The same Structs validate requests and generate OpenAPI."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ..config import ModelSettings

__all__ = (
    "EmbeddingOutput",
    "EmbeddingParameters",
    "ErrorBody",
    "ErrorDetail",
    "HealthModels",
    "InferRequest",
    "InferResponse",
    "ModelInfo",
    "ModelList",
    "ModelVersionInfo",
    "PriorityName",
    "TextInput",
    "Timing",
)

PriorityName = Literal["critical", "high", "normal", "medium", "low"]


class InferRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Envelope of `POST /api/v1/infer/{model_id}`; `input_data` and `parameters` depend on the task."""

    input_data: dict[str, Any]
    parameters: dict[str, Any] = {}
    priority: Annotated[int, Meta(ge=1, le=4)] | PriorityName = 3
    timeout_seconds: Annotated[float, Meta(gt=0, le=86400)] | None = None
    version: str | None = None
    stream: bool = False
    return_: Literal["auto", "inline", "url"] = msgspec.field(default="auto", name="return")


class TextInput(msgspec.Struct, forbid_unknown_fields=True):
    """`input_data` of txt2embed (and later txt2txt): one text or a non-empty list."""

    text: str | Annotated[list[str], Meta(min_length=1)]


class EmbeddingParameters(msgspec.Struct, forbid_unknown_fields=True):
    """`parameters` of txt2embed."""

    normalize: bool = False
    encoding: Literal["float", "base64"] = "float"


class Timing(msgspec.Struct):
    queue_ms: float
    inference_ms: float
    total_ms: float


class EmbeddingOutput(msgspec.Struct):
    """One row per input; with `encoding=base64` each row is base64 of little-endian float32."""

    embeddings: list[list[float] | str]
    dim: int


class InferResponse(msgspec.Struct):
    model_id: str
    version: str
    task_type: str
    output: EmbeddingOutput
    timing: Timing


class ErrorDetail(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    field: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class ModelVersionInfo(msgspec.Struct):
    version: str
    revision: str
    size_bytes: int
    files: int
    created_at: float


class ModelInfo(msgspec.Struct):
    id: str
    task_type: str
    source: str
    active_version: str
    versions: list[ModelVersionInfo]
    settings: ModelSettings


class ModelList(msgspec.Struct):
    models: list[ModelInfo]


class HealthModel(msgspec.Struct):
    model_id: str
    version: str
    healthy: bool
    state: str
    reason: str | None = None


class HealthModels(msgspec.Struct):
    models: list[HealthModel]
