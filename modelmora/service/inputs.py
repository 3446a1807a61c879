"""Typed task inputs and parameters, protocol-neutral: every front end validates into them.

The same Structs generate the REST schema. `convert` validates a decoded value against one
of them and raises `InvalidInput` naming the field (as a JSON path under `prefix`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from ..errors import InvalidInput
from ..images import ImageRef

__all__ = (
    "CaptionParameters",
    "EmbeddingParameters",
    "GenerationParameters",
    "ImageData",
    "ImageGenerationParameters",
    "ImageInput",
    "TextInput",
    "convert",
    "literal_choices",
    "split_validation",
)

T = TypeVar("T")


class TextInput(msgspec.Struct, forbid_unknown_fields=True):
    """`input_data` of txt2embed, txt2txt (prompts) and txt2img (prompts): one text or a non-empty list."""

    text: str | Annotated[list[str], Meta(min_length=1)]


class ImageInput(msgspec.Struct, forbid_unknown_fields=True):
    """`input_data` of img2embed and img2txt: one image or a non-empty list.

    Each image is base64 (PNG, JPEG or WebP), a data URI, or an http(s) URL.
    """

    image: str | Annotated[list[str], Meta(min_length=1)]


@dataclass(frozen=True, slots=True)
class ImageData:
    """`input_data` of img2embed and img2txt from a binary protocol (gRPC): each image as the bytes of a
    PNG, JPEG or WebP file, raw RGB `Pixels`, or a string as in `ImageInput`. Errors name the images
    as `$.input_data.image[i]`."""

    images: list[ImageRef]


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
    add_special_tokens: bool = True
    """Let the tokenizer add its special tokens (e.g. a BOS) to each prompt; false for a prompt that
    already holds them, such as one rendered with the model's chat template."""


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
    """Validate a decoded value against `type_`; `InvalidInput` naming the field on failure."""
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as exc:
        message, field = split_validation(exc, prefix, type_)
        raise InvalidInput(message, field=field) from None
