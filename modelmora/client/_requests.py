"""Arguments to request messages: texts, images, priority, return mode. An argument the client
cannot send is refused here with `InvalidArgumentError` (attempts 0), naming it as the server would."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from grpclib.const import Status

from .._proto.modelmora import v1
from .errors import InvalidArgumentError

__all__ = (
    "ImageInput",
    "PilImage",
    "PriorityName",
    "ReturnMode",
    "caption_request",
    "embed_request",
    "generation_request",
    "image_request",
    "images",
    "priority",
    "refuse",
    "return_mode",
    "texts",
)

PriorityName = Literal["critical", "high", "normal", "medium", "low"]
"""Scheduling classes by name ("medium" is "normal"); 1 (critical) to 4 (low) by number."""
ReturnMode = Literal["auto", "inline", "url"]
"""How generated images come back: PNG bytes (inline), a result-store URL, or the server's choice."""

_PRIORITIES = {"critical": 1, "high": 2, "normal": 3, "medium": 3, "low": 4}
_RETURN = {"auto": v1.ReturnMode.AUTO, "inline": v1.ReturnMode.INLINE, "url": v1.ReturnMode.URL}


@runtime_checkable
class PilImage(Protocol):
    """What the client needs of a PIL image (PIL itself is not imported)."""

    def convert(self, mode: str) -> Any: ...


ImageInput = bytes | bytearray | memoryview | str | os.PathLike[str] | np.ndarray | PilImage
"""An image: encoded file bytes (PNG, JPEG, WebP), a path to such a file, an http(s) URL the server
fetches, a uint8 array of height x width x 3 RGB pixels, or a PIL image (sent as its RGB pixels)."""


def refuse(message: str, field: str) -> InvalidArgumentError:
    return InvalidArgumentError(Status.INVALID_ARGUMENT, f"{field}: {message}", field=field, attempts=0)


def texts(value: str | Sequence[str], field: str = "texts") -> list[str]:
    """One text or a sequence of them, as the message's list (a single string: one input)."""
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise refuse("give at least one text", field)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise refuse(f"expected a string, got {type(item).__name__}", f"{field}[{i}]")
    return items


def _pixels(array: np.ndarray, field: str) -> v1.Image:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        expected = "an array image must be uint8 of shape (height, width, 3)"
        raise refuse(f"{expected}, got {array.dtype} {array.shape}", field)
    height, width = int(array.shape[0]), int(array.shape[1])
    return v1.Image(raw=v1.RawImage(rgb=np.ascontiguousarray(array).tobytes(), height=height, width=width))


def _image(value: object, field: str) -> v1.Image:
    if isinstance(value, bytes | bytearray | memoryview):
        return v1.Image(encoded=bytes(value))
    if isinstance(value, np.ndarray):
        return _pixels(value, field)
    if isinstance(value, str):
        if value.lower().startswith(("http://", "https://")):
            return v1.Image(url=value)
        raise refuse("a string image must be an http(s) URL (pass a file as a pathlib.Path or its bytes)", field)
    if isinstance(value, os.PathLike):
        try:
            with open(value, "rb") as f:
                return v1.Image(encoded=f.read())
        except OSError as exc:
            raise refuse(f"cannot read {os.fspath(value)!r}: {exc.strerror or exc}", field) from None
    if isinstance(value, PilImage):
        return _pixels(np.asarray(value.convert("RGB")), field)
    raise refuse(f"unsupported image type {type(value).__name__}", field)


def images(value: ImageInput | Sequence[ImageInput], field: str = "images") -> list[v1.Image]:
    """One image or a sequence of them as messages."""
    items: list[object] = (
        list(value) if isinstance(value, list | tuple) else [value]  # a str, bytes or array is one image
    )
    if not items:
        raise refuse("give at least one image", field)
    return [_image(item, f"{field}[{i}]") for i, item in enumerate(items)]


def priority(value: int | str | None) -> v1.Priority:
    """A priority by number (1-4) or name, in any case; None: normal."""
    if value is None:
        return v1.Priority.UNSPECIFIED
    if isinstance(value, str):
        number = _PRIORITIES.get(value.lower())
        if number is None:
            raise refuse(f"unknown priority {value!r} (critical, high, normal, medium, low)", "priority")
        return v1.Priority(number)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4:
        return v1.Priority(value)
    raise refuse(f"unknown priority {value!r} (1-4 or a name)", "priority")


def return_mode(value: str) -> v1.ReturnMode:
    mode = _RETURN.get(value)
    if mode is None:
        raise refuse(f"unknown return mode {value!r} (auto, inline, url)", "return_mode")
    return mode


def embed_request(
    model: str,
    texts_: str | Sequence[str] | None,
    images_: ImageInput | Sequence[ImageInput] | None,
    normalize: bool,
    version: str | None,
    priority_: int | str | None,
) -> v1.InferRequest:
    """An embedding request (txt2embed or img2embed)."""
    if (texts_ is None) == (images_ is None):
        raise refuse("give texts or images (one of them)", "texts")
    return v1.InferRequest(
        model_id=model,
        version=version or "",
        texts=texts(texts_) if texts_ is not None else [],
        images=images(images_) if images_ is not None else [],
        embedding=v1.EmbeddingParameters(normalize=normalize),
        priority=priority(priority_),
    )


def generation_request(
    model: str,
    prompt: str | Sequence[str],
    version: str | None,
    priority_: int | str | None,
    parameters: dict[str, Any],
) -> v1.InferRequest:
    """A text generation request (txt2txt); `parameters`: those given (GenerationParameters' fields)."""
    stop = parameters.pop("stop", None)
    if stop is not None:
        parameters["stop"] = texts(stop, "generation.stop")
    return v1.InferRequest(
        model_id=model,
        version=version or "",
        texts=texts(prompt),
        generation=v1.GenerationParameters(**parameters),
        priority=priority(priority_),
    )


def caption_request(
    model: str,
    images_: ImageInput | Sequence[ImageInput],
    version: str | None,
    priority_: int | str | None,
    parameters: dict[str, Any],
) -> v1.InferRequest:
    """A captioning request (img2txt); `parameters`: those given (CaptionParameters' fields)."""
    return v1.InferRequest(
        model_id=model,
        version=version or "",
        images=images(images_),
        caption=v1.CaptionParameters(**parameters),
        priority=priority(priority_),
    )


def image_request(
    model: str,
    prompt: str | Sequence[str],
    version: str | None,
    priority_: int | str | None,
    mode: str,
    parameters: dict[str, Any],
) -> v1.InferRequest:
    """An image generation request (txt2img); `parameters`: those given (ImageGenerationParameters')."""
    return v1.InferRequest(
        model_id=model,
        version=version or "",
        texts=texts(prompt),
        image_generation=v1.ImageGenerationParameters(**parameters),
        priority=priority(priority_),
        return_mode=return_mode(mode),
    )
