"""How each task type's typed inputs and parameters become worker inputs and parameters,
and how a worker's outputs become the typed result.

One `TaskAdapter` per `TaskType`, built on the task-type table (`modelmora.tasks`).
`prepare()` validates inputs and parameters (422 naming the field), decodes images to raw
RGB arrays (they travel to the worker through shared memory as they are) and returns what
the scheduler queues. Requests batch together only when their worker parameters are equal.
`output()` builds the typed result from the request's share of the batch's outputs;
generated images go to the result store unless inline results are asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import msgspec

from ..config import Settings
from ..errors import InvalidInput, ModelMoraError
from ..images import ImageLimits, ImageRef, LoadedImages, PixelBudget, load_images
from ..lifecycle import TensorData
from ..results import ResultStore
from ..tasks import TASKS, TaskInfo, TaskType
from .inputs import (
    CaptionParameters,
    EmbeddingParameters,
    GenerationParameters,
    ImageData,
    ImageGenerationParameters,
    ImageInput,
    TextInput,
    convert,
)
from .outputs import Embeddings, GeneratedImage, Images, Output, Texts

__all__ = ("ADAPTERS", "Prepared", "ReturnMode", "TaskAdapter")

ReturnMode = Literal["auto", "inline", "url"]


@dataclass(frozen=True, slots=True)
class Prepared:
    inputs: dict[str, list[Any]]
    """Worker inputs by field: "text" -> [str], "image" -> [TensorData (h, w, 3) uint8]."""
    params: dict[str, Any]
    """Worker parameters; requests with equal parameters share batches."""
    options: Any
    """The validated parameters struct."""
    return_mode: ReturnMode
    images: LoadedImages | None = None
    """The decoded images, holding their room in the server's pixel budget: release when answered."""

    def release(self) -> None:
        """Give the request's decoded pixels back to the server's budget (once)."""
        if self.images is not None:
            self.images.release()


@dataclass(frozen=True, slots=True)
class TaskAdapter:
    info: TaskInfo
    params_type: type[Any]
    worker_params: Callable[[Any, bool], dict[str, Any]]

    async def prepare(
        self,
        inputs: Any,
        parameters: Any,
        *,
        stream: bool,
        return_mode: ReturnMode,
        settings: Settings,
        limits: ImageLimits,
        results: ResultStore | None,
        pixels: PixelBudget | None = None,
        deadline: float = math.inf,
    ) -> Prepared:
        """Validate and prepare one request (inputs and parameters typed, or as decoded JSON).

        Raises:
            InvalidInput: a field is wrong (named as a JSON path of the REST envelope).
            PayloadTooLarge: an image is over its limit.
        """
        info = self.info
        if stream and not info.streams:
            streaming = ", ".join(t for t, i in TASKS.items() if i.streams)
            raise InvalidInput(f"{info.type} does not stream; stream is for {streaming}", field="$.stream")
        if return_mode == "url" and info.output != "images":
            raise InvalidInput(f'return "url" is for generated images; {info.type} answers inline', field="$.return")
        if return_mode == "url" and results is None:
            raise InvalidInput(
                'return "url" needs a result store; this server is configured with result_store = "inline"',
                field="$.return",
            )
        if isinstance(parameters, _PARAMETER_TYPES) and not isinstance(parameters, self.params_type):
            raise InvalidInput(
                f"{info.type} takes {self.params_type.__name__}, not {type(parameters).__name__}",
                field="$.parameters",
            )
        options = (
            parameters
            if isinstance(parameters, self.params_type)
            else convert(parameters, self.params_type, "$.parameters")
        )
        worker_params = self.worker_params(options, stream)
        if info.input_kind == "text" and isinstance(inputs, ImageData):
            raise InvalidInput(f"{info.type} takes texts, not images", field="$.input_data.image")
        if info.input_kind == "image" and isinstance(inputs, TextInput):
            raise InvalidInput(f"{info.type} takes images, not texts", field="$.input_data.text")
        if info.input_kind == "text":
            return Prepared({"text": _texts(inputs, settings)}, worker_params, options, return_mode)
        images = await _images(inputs, settings, limits, pixels, deadline)
        arrays = [TensorData("|u1", (p.height, p.width, 3), p.data) for p in images]
        return Prepared({"image": arrays}, worker_params, options, return_mode, images)

    async def output(self, result: dict[str, Any], prepared: Prepared, results: ResultStore | None) -> Output:
        """The typed result of one request from its share of the batch's outputs."""
        kind = self.info.output
        if kind == "embeddings":
            vectors: TensorData = result["embeddings"]
            return Embeddings(vectors)
        if kind == "texts":
            return Texts(
                list(result["texts"]),
                list(result["finish_reasons"]),
                _counts(result.get("prompt_tokens")),
                _counts(result.get("completion_tokens")),
            )
        return await _store_images(result["images"], prepared.return_mode, results)


def _counts(value: Any) -> list[int] | None:
    """A worker's per-item counts (a 1-D int64 array), if it sent them."""
    if not isinstance(value, TensorData):
        return None
    counts: list[int] = memoryview(value.data).cast("q").tolist()
    return counts


def _texts(inputs: Any, settings: Settings) -> list[str]:
    inp = inputs if isinstance(inputs, TextInput) else convert(inputs, TextInput, "$.input_data")
    texts = [inp.text] if isinstance(inp.text, str) else inp.text
    if not texts:  # a TextInput built by a front end rather than decoded
        raise InvalidInput("at least one text is needed", field="$.input_data.text")
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


async def _images(
    inputs: Any, settings: Settings, limits: ImageLimits, pixels: PixelBudget | None, deadline: float
) -> LoadedImages:
    limit = settings.max_images_per_request
    refs: Sequence[ImageRef]
    field: str | None
    if isinstance(inputs, ImageData):
        refs, field = inputs.images, "$.input_data.image"
        if not refs:
            raise InvalidInput("at least one image is needed", field=field)
    else:
        inp = inputs if isinstance(inputs, ImageInput) else convert(inputs, ImageInput, "$.input_data")
        refs, field = ([inp.image], None) if isinstance(inp.image, str) else (inp.image, "$.input_data.image")
    if field is not None and len(refs) > limit:
        raise InvalidInput(
            f"{len(refs)} images exceed the limit of {limit} per request (max_images_per_request)", field=field
        )
    try:
        return await load_images(refs, field or "$.input_data.image", limits, budget=pixels, deadline=deadline)
    except ModelMoraError as exc:
        if field is None and exc.field == "$.input_data.image[0]":
            exc.field = "$.input_data.image"  # a single image is not a list
        raise


async def _store_images(pngs: list[bytes], return_mode: ReturnMode, store: ResultStore | None) -> Images:
    if return_mode == "inline" or store is None:
        return Images([GeneratedImage(png=png) for png in pngs])
    refs: list[GeneratedImage] = [GeneratedImage()] * len(pngs)

    async def put(i: int, png: bytes) -> None:
        stored = await store.put(png, content_type="image/png", suffix=".png")
        refs[i] = GeneratedImage(url=stored.url, expires_at=stored.expires_at)

    try:
        async with anyio.create_task_group() as tg:
            for i, png in enumerate(pngs):
                tg.start_soon(put, i, png)
    except ExceptionGroup as group:  # a store error, not the group that carried it
        first = group.exceptions[0]
        while isinstance(first, ExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return Images(refs)


def _plain(options: Any, stream: bool) -> dict[str, Any]:
    params: dict[str, Any] = msgspec.to_builtins(options)
    return params


def _embedding_params(options: Any, stream: bool) -> dict[str, Any]:
    return {"normalize": options.normalize}


def _adapter(
    task: TaskType, params_type: type[Any], worker_params: Callable[[Any, bool], dict[str, Any]]
) -> TaskAdapter:
    return TaskAdapter(TASKS[task], params_type, worker_params)


_PARAMETER_TYPES = (EmbeddingParameters, CaptionParameters, GenerationParameters, ImageGenerationParameters)

ADAPTERS: Mapping[TaskType, TaskAdapter] = {
    a.info.type: a
    for a in (
        _adapter(TaskType.TXT2EMBED, EmbeddingParameters, _embedding_params),
        _adapter(TaskType.IMG2EMBED, EmbeddingParameters, _embedding_params),
        _adapter(TaskType.IMG2TXT, CaptionParameters, _plain),
        _adapter(TaskType.TXT2TXT, GenerationParameters, lambda p, s: {**_plain(p, s), "stream": s}),
        _adapter(TaskType.TXT2IMG, ImageGenerationParameters, _plain),
    )
}
"""Task type -> how the core serves it."""
