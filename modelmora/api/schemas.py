"""Public request/response types. The same Structs validate requests and generate OpenAPI."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ..config import ModelSettings

__all__ = (
    "CaptionParameters",
    "EmbeddingOutput",
    "EmbeddingParameters",
    "EmbeddingResponse",
    "ErrorBody",
    "ErrorDetail",
    "GenerationParameters",
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
    priority: Annotated[int, Meta(ge=1, le=4)] | PriorityName = 3
    timeout_seconds: Annotated[float, Meta(gt=0, le=86400)] | None = None
    version: str | None = None
    stream: bool = False
    """txt2txt and txt2img: answer with server-sent events (tokens / progress, then the result)."""
    return_: Literal["auto", "inline", "url"] = msgspec.field(default="auto", name="return")


class TextInput(msgspec.Struct, forbid_unknown_fields=True):
    """`input_data` of txt2embed, txt2txt (prompts) and txt2img (prompts): one text or a non-empty list."""

    text: str | Annotated[list[str], Meta(min_length=1)]


class ImageInput(msgspec.Struct, forbid_unknown_fields=True):
    """`input_data` of img2embed and img2txt: one image or a non-empty list.

    Each image is base64 (PNG, JPEG or WebP), a data URI, or an http(s) URL.
    """

    image: str | Annotated[list[str], Meta(min_length=1)]


class EmbeddingParameters(msgspec.Struct, forbid_unknown_fields=True):
    """`parameters` of txt2embed and img2embed."""

    normalize: bool = False
    encoding: Literal["float", "base64"] = "float"
    """base64: each row as base64 of little-endian float32."""


Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]


class CaptionParameters(msgspec.Struct, forbid_unknown_fields=True):
    """`parameters` of img2txt."""

    max_tokens: Annotated[int, Meta(ge=1, le=512)] = 30
    temperature: Annotated[float, Meta(ge=0, le=2)] = 0.0
    """0: greedy decoding; above: sampling."""
    seed: Seed | None = None


class GenerationParameters(msgspec.Struct, forbid_unknown_fields=True):
    """`parameters` of txt2txt."""

    max_tokens: Annotated[int, Meta(ge=1, le=4096)] = 64
    temperature: Annotated[float, Meta(ge=0, le=2)] = 1.0
    """0: greedy decoding; above: sampling."""
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0
    stop: Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=8)] = []
    """Generation ends before the first of these strings (which is not returned)."""
    seed: Seed | None = None
    """The same seed gives the same text, whatever else runs in the same batch."""


Dimension = Annotated[int, Meta(ge=8, le=4096, multiple_of=8)]


class ImageGenerationParameters(msgspec.Struct, forbid_unknown_fields=True):
    """`parameters` of txt2img."""

    steps: Annotated[int, Meta(ge=1, le=200)] = 20
    guidance_scale: Annotated[float, Meta(ge=0, le=50)] = 7.5
    width: Dimension | None = None
    """Pixels, a multiple of 8; default: the model's size."""
    height: Dimension | None = None
    seed: Seed | None = None
    negative_prompt: Annotated[str, Meta(max_length=10_000)] | None = None


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
