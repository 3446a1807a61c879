"""The five task types as the API sees them: how a request's fields become worker inputs and
parameters, and how a worker's outputs become the response.

One `Task` per task type. `prepare()` validates `input_data` and `parameters` against the
task's msgspec types (422 naming the field), decodes images to raw RGB arrays (they travel
to the worker through shared memory as they are), and returns what the scheduler queues.
Requests batch together only when their worker parameters are equal. `respond()` builds
the task's output from the request's share of the batch's outputs; generated images go to
the result store (or inline as base64).
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import msgspec

from ..config import Settings
from ..errors import InvalidInput, ModelMoraError
from ..images import ImageLimits, load_images
from ..lifecycle import TensorData
from ..results import ResultStore, absolute_url
from .schemas import (
    CaptionParameters,
    EmbeddingOutput,
    EmbeddingParameters,
    EmbeddingResponse,
    GenerationParameters,
    ImageGenerationParameters,
    ImageInput,
    ImageOutput,
    ImageRef,
    ImageResponse,
    InferRequest,
    TextInput,
    TextOutput,
    TextResponse,
)

__all__ = ("TASKS", "Context", "Prepared", "Task", "convert")

T = TypeVar("T")


def split_validation(exc: msgspec.ValidationError, prefix: str, type_: Any = None) -> tuple[str, str]:
    """msgspec's "message - at `$.path`" as (message, prefix + path). With the validated `type_`,
    a refused enum value also lists the accepted ones."""
    text = str(exc)
    message, sep, path = text.rpartition(" - at `")
    if not sep:
        message, path = text, "$"
    path = path.rstrip("`")
    if type_ is not None and message.startswith("Invalid enum value"):
        choices = literal_choices(type_, path)
        if choices:
            message += f" (expected one of: {', '.join(choices)})"
    return message, prefix + path[1:] if path.startswith("$") else prefix


def literal_choices(type_: Any, path: str) -> list[str]:
    """The values the Literal field at `path` ("$.a.b", within `type_`) accepts; [] when the path
    leads elsewhere. Names that differ only in case are listed once."""
    info: Any = msgspec.inspect.type_info(type_)
    for name in path.removeprefix("$").split(".")[1:]:
        structs = [t for t in getattr(info, "types", (info,)) if isinstance(t, msgspec.inspect.StructType)]
        field = next((f for t in structs for f in t.fields if f.encode_name == name), None)
        if field is None:
            return []
        info = field.type
    values = [
        str(v) for t in getattr(info, "types", (info,)) if isinstance(t, msgspec.inspect.LiteralType) for v in t.values
    ]
    listed: dict[str, str] = {}
    for v in values:  # one entry per name, in lower case where that form is accepted
        if v.lower() not in listed or v == v.lower():
            listed[v.lower()] = v
    return list(listed.values())


def convert(obj: Any, type_: type[T], prefix: str) -> T:
    """Validate a decoded JSON value against `type_`; 422 naming the field on failure."""
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as exc:
        message, field = split_validation(exc, prefix, type_)
        raise InvalidInput(message, field=field) from None


@dataclass(frozen=True, slots=True)
class Context:
    """What preparing a request and shaping its response need from the server."""

    settings: Settings
    limits: ImageLimits
    results: ResultStore | None
    base_url: str
    """The server's base URL as the client reached it (for relative result URLs)."""


@dataclass(frozen=True, slots=True)
class Prepared:
    inputs: dict[str, list[Any]]
    """Worker inputs by field: "text" -> [str], "image" -> [TensorData (h, w, 3) uint8]."""
    params: dict[str, Any]
    """Worker parameters; requests with equal parameters share batches."""
    options: Any
    """The validated `parameters` struct (response shaping reads it)."""
    return_mode: str


@dataclass(frozen=True, slots=True)
class Task:
    name: str
    input_kind: str
    """ "text" or "image"."""
    params_type: type[Any]
    response_type: type[Any]
    streams: bool
    """Sends events while it runs (tokens, progress): `"stream": true` is allowed."""
    worker_params: Callable[[Any, bool], dict[str, Any]]
    respond: Callable[[dict[str, Any], Prepared, Context], Awaitable[Any]]

    async def prepare(self, env: InferRequest, ctx: Context) -> Prepared:
        if env.stream and not self.streams:
            raise InvalidInput(f"{self.name} does not stream; stream is for txt2txt and txt2img", field="$.stream")
        options = convert(env.parameters, self.params_type, "$.parameters")
        if self.input_kind == "text":
            inputs: dict[str, list[Any]] = {"text": _texts(env.input_data, ctx.settings)}
        else:
            inputs = {"image": await _images(env.input_data, ctx)}
        if env.return_ == "url" and self.response_type is ImageResponse and ctx.results is None:
            raise InvalidInput(
                'return "url" needs a result store; this server is configured with result_store = "inline"',
                field="$.return",
            )
        return Prepared(inputs, self.worker_params(options, env.stream), options, env.return_)


def _texts(input_data: dict[str, Any], settings: Settings) -> list[str]:
    inp = convert(input_data, TextInput, "$.input_data")
    texts = [inp.text] if isinstance(inp.text, str) else inp.text
    if len(texts) > settings.max_texts_per_request:
        raise InvalidInput(
            f"{len(texts)} texts exceed the limit of {settings.max_texts_per_request} per request"
            " (max_texts_per_request)",
            field="$.input_data.text",
        )
    for i, t in enumerate(texts):
        if len(t) > settings.max_text_chars:
            where = "$.input_data.text" if isinstance(inp.text, str) else f"$.input_data.text[{i}]"
            raise InvalidInput(
                f"text of {len(t)} characters exceeds the limit of {settings.max_text_chars} (max_text_chars)",
                field=where,
            )
    return texts


async def _images(input_data: dict[str, Any], ctx: Context) -> list[TensorData]:
    inp = convert(input_data, ImageInput, "$.input_data")
    limit = ctx.settings.max_images_per_request
    if isinstance(inp.image, str):
        refs, field = [inp.image], None
    else:
        refs, field = inp.image, "$.input_data.image"
        if len(refs) > limit:
            raise InvalidInput(
                f"{len(refs)} images exceed the limit of {limit} per request (max_images_per_request)", field=field
            )
    try:
        pixels = await load_images(refs, field or "$.input_data.image", ctx.limits)
    except ModelMoraError as exc:
        if field is None and exc.field == "$.input_data.image[0]":
            exc.field = "$.input_data.image"  # a single image is not a list
        raise
    return [TensorData("|u1", (p.height, p.width, 3), p.data) for p in pixels]


# -- responses ---------------------------------------------------------------------------------


async def _embeddings(result: dict[str, Any], prepared: Prepared, ctx: Context) -> EmbeddingOutput:
    emb: TensorData = result["embeddings"]
    rows: list[list[float] | str]
    if prepared.options.encoding == "base64":
        rows = [base64.b64encode(b).decode("ascii") for b in emb.row_bytes()]
    else:
        rows = [*emb.rows()]
    return EmbeddingOutput(rows, emb.shape[1])


async def _text(result: dict[str, Any], prepared: Prepared, ctx: Context) -> TextOutput:
    return TextOutput(list(result["texts"]), list(result["finish_reasons"]))


async def _images_out(result: dict[str, Any], prepared: Prepared, ctx: Context) -> ImageOutput:
    pngs: list[bytes] = result["images"]
    store = ctx.results
    if prepared.return_mode == "inline" or store is None:
        return ImageOutput([ImageRef(b64_png=base64.b64encode(png).decode("ascii")) for png in pngs])
    refs: list[ImageRef] = [ImageRef()] * len(pngs)

    async def put(i: int, png: bytes) -> None:
        stored = await store.put(png, content_type="image/png", suffix=".png")
        refs[i] = ImageRef(url=absolute_url(stored.url, ctx.base_url), expires_at=stored.expires_at)

    async with anyio.create_task_group() as tg:
        for i, png in enumerate(pngs):
            tg.start_soon(put, i, png)
    return ImageOutput(refs)


def _plain(options: Any, stream: bool) -> dict[str, Any]:
    params: dict[str, Any] = msgspec.to_builtins(options)
    return params


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "txt2embed",
            "text",
            EmbeddingParameters,
            EmbeddingResponse,
            False,
            lambda p, s: {"normalize": p.normalize},
            _embeddings,
        ),
        Task(
            "img2embed",
            "image",
            EmbeddingParameters,
            EmbeddingResponse,
            False,
            lambda p, s: {"normalize": p.normalize},
            _embeddings,
        ),
        Task("img2txt", "image", CaptionParameters, TextResponse, False, _plain, _text),
        Task(
            "txt2txt",
            "text",
            GenerationParameters,
            TextResponse,
            True,
            lambda p, s: {**_plain(p, s), "stream": s},
            _text,
        ),
        Task("txt2img", "text", ImageGenerationParameters, ImageResponse, True, _plain, _images_out),
    )
}
"""Task type -> how the API serves it."""
