"""Public request/response types. The same Structs validate requests and generate OpenAPI."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ..config import ModelSettings
from ..registry import ModelMetadata
from ..service import (
    CaptionParameters,
    EmbeddingParameters,
    GenerationParameters,
    HealthModel,
    HealthModels,
    ImageGenerationParameters,
    ImageInput,
    TextInput,
)
from ..tasks import TaskType

__all__ = (
    "ActivateVersion",
    "DownloadVersion",
    "CaptionParameters",
    "EmbeddingOutput",
    "EmbeddingParameters",
    "EmbeddingResponse",
    "ErrorBody",
    "ErrorDetail",
    "GenerationParameters",
    "HealthModel",
    "HealthModels",
    "ImageGenerationParameters",
    "ImageInput",
    "ImageOutput",
    "ImageRef",
    "ImageResponse",
    "InferRequest",
    "InferResponse",
    "ModelInfo",
    "ModelList",
    "ModelVersionInfo",
    "PriorityName",
    "RegisterModel",
    "TextInput",
    "TextOutput",
    "TextResponse",
    "Timing",
)

PriorityName = Literal["critical", "high", "normal", "medium", "low", "CRITICAL", "HIGH", "NORMAL", "MEDIUM", "LOW"]
"""A priority by name, in lower or upper case ("medium" is "normal")."""


class InferRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Envelope of `POST /api/v1/infer/{model_id}`; `input_data` and `parameters` depend on the task."""

    input_data: dict[str, Any]
    parameters: dict[str, Any] = {}
    priority: Annotated[float, Meta(ge=1, le=4, multiple_of=1)] | PriorityName = 3
    """1 (critical) to 4 (low), or a name; an integer, which JSON may also write as 3.0."""
    timeout_seconds: Annotated[float, Meta(gt=0, le=86400)] | None = None
    version: str | None = None
    stream: bool = False
    """txt2txt and txt2img: answer with server-sent events (tokens / progress, then the result)."""
    return_: Literal["auto", "inline", "url"] = msgspec.field(default="auto", name="return")


class Timing(msgspec.Struct):
    queue_ms: float
    inference_ms: float
    total_ms: float


class EmbeddingOutput(msgspec.Struct):
    """One row per input; with `encoding=base64` each row is base64 of little-endian float32."""

    embeddings: list[list[float] | str]
    dim: int


class TextOutput(msgspec.Struct):
    """One text per input, and why its generation ended: "stop" (end of text or a stop string) or "length"."""

    texts: list[str]
    finish_reasons: list[str]


class ImageRef(msgspec.Struct, omit_defaults=True):
    """A generated image: a signed or presigned URL valid until `expires_at` (unix time), or inline PNG."""

    url: str | None = None
    expires_at: float | None = None
    b64_png: str | None = None


class ImageOutput(msgspec.Struct):
    """One image per prompt."""

    images: list[ImageRef]


class _Response(msgspec.Struct):
    model_id: str
    version: str
    task_type: str
    timing: Timing


class EmbeddingResponse(_Response):
    """Response of txt2embed and img2embed."""

    output: EmbeddingOutput


class TextResponse(_Response):
    """Response of txt2txt and img2txt."""

    output: TextOutput


class ImageResponse(_Response):
    """Response of txt2img."""

    output: ImageOutput


InferResponse = EmbeddingResponse | TextResponse | ImageResponse


class ErrorDetail(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    field: str | None = None
    status: str | None = None
    """An async job's status, where its state is at fault (`job_not_finished`)."""


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class ModelVersionInfo(msgspec.Struct):
    version: str
    revision: str
    """The resolved revision of the source (a Hugging Face commit...)."""
    size_bytes: int
    files: int
    created_at: float
    checksums: dict[str, str] = {}
    """Relative path of each file -> its SHA-256 (hex), as recorded at install."""


class ModelInfo(msgspec.Struct):
    """A registered model: versions in semantic-version order, its metadata, its settings."""

    id: str
    task_type: str
    source: str
    active_version: str
    versions: list[ModelVersionInfo]
    settings: ModelSettings
    metadata: ModelMetadata = ModelMetadata()
    active_pinned: bool = False
    """The active version is pinned: an install does not move it, only an explicit activation."""
    created_at: float = 0.0
    updated_at: float = 0.0


class ModelList(msgspec.Struct):
    models: list[ModelInfo]
    total: int = 0
    """Models matching the filter, of which `models` is the page asked for (`limit`, `offset`)."""


class RegisterModel(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /api/v1/models`: register a model version from a source, in the background."""

    source: Annotated[str, Meta(min_length=1, max_length=4096)]
    """An http(s) URL of an archive or a file, s3://bucket/prefix, a Hugging Face repo org/name[@revision],
    or a catalog id. Local paths are refused (use mm install on the server's machine)."""
    id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] | None = None
    """Model id (default: the catalog's, or the repo's, archive's or prefix's name)."""
    task_type: TaskType | None = None
    """Required when neither the catalog nor the files tell."""
    version: str | None = None
    """Semantic version (default 1.0.0)."""
    force: bool = False
    """Reinstall a version already installed."""
    activate: bool = False
    """Make it the active version (a model's first version always is)."""
    metadata: ModelMetadata | None = None
    settings: ModelSettings | None = None
    check: bool = True
    """Check that the files are laid out as the task's loader expects."""


class DownloadVersion(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /api/v1/models/{id}/download` (optional)."""

    version: str | None = None
    """Default: the active version."""


class ActivateVersion(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /api/v1/models/{id}/versions/{version}` (optional)."""

    pin: bool | None = None
    """true: pin the version (later installs do not move it); false: unpin; absent: unchanged."""
