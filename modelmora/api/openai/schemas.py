"""Request and response bodies of the OpenAI-compatible endpoints (msgspec Structs).

Requests take OpenAI's fields and, as extra body fields, ours: `priority`, `timeout_seconds` and
`version` (also accepted as headers, see `options`). A field OpenAI defines that this server cannot
honour is refused by the endpoint (400 naming it) rather than ignored, unless it is only advice
(`user`). Unknown fields are refused too: a misspelt parameter should not pass silently.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ..schemas import PriorityName

__all__ = (
    "ChatChoice",
    "ChatMessage",
    "ChatRequest",
    "ChatResponse",
    "CompletionChoice",
    "CompletionRequest",
    "CompletionResponse",
    "EmbeddingObject",
    "EmbeddingsRequest",
    "EmbeddingsResponse",
    "EmbeddingsUsage",
    "ImageObject",
    "ImagesRequest",
    "ImagesResponse",
    "ModelObject",
    "ModelsResponse",
    "StreamOptions",
    "Usage",
)

Priority = Annotated[int, Meta(ge=1, le=4)] | PriorityName
Timeout = Annotated[float, Meta(gt=0, le=86400)]
Stop = str | Annotated[list[str], Meta(max_length=8)] | None


class _Extras(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Our own fields, beside OpenAI's."""

    priority: Priority | None = None
    """1 (critical) to 4 (low), or a name; default normal (3)."""
    timeout_seconds: Timeout | None = None
    """The request's deadline; default the task type's."""
    version: str | None = None
    """A model version; default the active one."""


class EmbeddingsRequest(_Extras, kw_only=True):
    model: str
    input: str | list[Any]
    """A text (an image, for an image-embedding model: base64, data URI or URL), or a non-empty list."""
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    """Keep the first `dimensions` values of each vector, then scale it back to unit length."""
    user: str | None = None


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class _Sampling(_Extras, kw_only=True):
    model: str
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[Any]
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    """A message; fields beyond these (an assistant message given back as the API returned it:
    `refusal`, `annotations`...) are ignored."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class ChatRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None


class ImagesRequest(_Extras, kw_only=True):
    prompt: Annotated[str, Meta(min_length=1)]
    model: str
    n: Annotated[int, Meta(ge=1, le=16)] = 1
    size: str | None = None
    """"WIDTHxHEIGHT" (multiples of 8), or "auto"/omitted: the model's own size."""
    response_format: Literal["url", "b64_json"] | None = None
    """Omitted: "url" when the server stores results, else "b64_json"."""
    output_format: Literal["png"] | None = None
    """Always PNG."""
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # ours: the diffusion parameters
    steps: Annotated[int, Meta(ge=1, le=200)] | None = None
    guidance_scale: Annotated[float, Meta(ge=0, le=50)] | None = None
    negative_prompt: str | None = None
    seed: int | None = None


# -- responses -----------------------------------------------------------------------------------


class EmbeddingObject(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingsUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(msgspec.Struct):
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingsUsage
    object: str = "list"


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: str = "text_completion"


class ChatChoice(msgspec.Struct):
    index: int
    message: dict[str, Any]
    finish_reason: str | None
    logprobs: None = None


class ChatResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None
    object: str = "chat.completion"


class ImageObject(msgspec.Struct, omit_defaults=True):
    url: str | None = None
    b64_json: str | None = None


class ImagesResponse(msgspec.Struct):
    created: int
    data: list[ImageObject]


class ModelObject(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    task_type: str
    """Ours: the model's task type (txt2embed, txt2txt, ...)."""
    object: str = "model"


class ModelsResponse(msgspec.Struct):
    data: list[ModelObject]
    object: str = "list"
