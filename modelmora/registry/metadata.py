"""What a model is, beyond its files: the metadata recorded at registration and how it is validated.

`ModelMetadata` is the one definition: the registry stores it, `POST /api/v1/models` and
`mm install` take it, and `schema/model-metadata.schema.json` is generated from it. Values are
checked by msgspec (types, ranges, patterns) and then across fields against the model's task
(`check_metadata`); every refusal is an `InvalidInput` whose message and `field` name the field
(`$.metadata.resources.memory_mb`).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ..config import ModelSettings
from ..errors import InvalidInput

__all__ = (
    "MAX_PARAMS_BYTES",
    "ModelConfig",
    "ModelMetadata",
    "ResourceHints",
    "check_metadata",
    "effective_settings",
    "parse_metadata",
    "validation_error",
)

MAX_PARAMS_BYTES = 64 * 1024
"""Custom parameters of one model, encoded as JSON, at most."""

_NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
_URL = r"^(https?|s3)://[^\s]+$"
_DEVICE = r"^(auto|cpu|cuda|cuda:\d+)$"
_PATTERN_WORDS = {
    _NO_CONTROL: "one line of text (no control characters)",
    _URL: "an http://, https:// or s3:// URL without spaces",
    _DEVICE: "'auto', 'cpu', 'cuda' or 'cuda:N'",
}
_EMBEDDING_TASKS = ("txt2embed", "img2embed")
_TEXT_TASKS = ("txt2embed", "txt2txt", "txt2img")


class ResourceHints(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """What one worker of the model needs, as its publisher or operator estimates it. The memory
    budget uses `memory_mb` / `gpu_vram_mb` for a version not yet measured (instead of weights x
    `admission_factor`); a measured worker replaces them."""

    memory_mb: Annotated[float, Meta(gt=0, le=16 * 2**20, description="RAM of a loaded worker, MiB")] | None = None
    gpu_vram_mb: (
        Annotated[float, Meta(gt=0, le=16 * 2**20, description="GPU memory of a loaded worker, MiB")] | None
    ) = None
    cpu_threads: Annotated[int, Meta(ge=1, le=1024, description="Threads its inference uses well")] | None = None


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """How the model is run. `batch_size` and `device` are the model's defaults: its settings
    (`mm set`, `PUT /api/v1/models/{id}`: `max_batch_size`, `device`) override them."""

    vector_size: (
        Annotated[int, Meta(ge=1, le=65_536, description="Dimension of its embeddings (embedding tasks)")] | None
    ) = None
    max_length: (
        Annotated[int, Meta(ge=1, le=2**20, description="Longest input, in tokens (text input tasks)")] | None
    ) = None
    batch_size: Annotated[int, Meta(ge=1, le=4096, description="Items per forward pass by default")] | None = None
    device: Annotated[str, Meta(pattern=_DEVICE, description="Device by default")] | None = None


class ModelMetadata(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """The descriptive metadata of a registered model (one per model, whatever its versions)."""

    display_name: Annotated[
        str, Meta(max_length=200, pattern=_NO_CONTROL, description="A human name; empty: the id")
    ] = ""
    description: Annotated[str, Meta(max_length=10_000, description="What the model does, for people")] = ""
    source_url: (
        Annotated[
            str,
            Meta(
                max_length=2048,
                pattern=_URL,
                description="Where the model comes from (a model card); set from the source when not given",
            ),
        ]
        | None
    ) = None
    resources: ResourceHints = ResourceHints()
    config: ModelConfig = ModelConfig()
    params: Annotated[
        dict[Annotated[str, Meta(min_length=1, max_length=128)], Any],
        Meta(description="Custom parameters: JSON values, at most 64 KiB encoded, kept and returned as given"),
    ] = {}


def validation_error(exc: msgspec.ValidationError, prefix: str) -> InvalidInput:
    """msgspec's "Expected `int` >= 1 - at `$.config.batch_size`" as an `InvalidInput` whose message
    starts with the field's name (`metadata.config.batch_size: expected ...`) and whose `field` is its
    JSON path under `prefix` (`$.metadata.config.batch_size`)."""
    text = str(exc)
    message, sep, path = text.rpartition(" - at `")
    if not sep:
        message, path = text, "$"
    path = path.rstrip("`")
    if path.startswith("key` in `"):  # a key of a mapping: "... - at `key` in `$.params`"
        path = path.removeprefix("key` in `")
        message = f"a key: {message[:1].lower()}{message[1:]}"
    field = prefix + path[1:] if path.startswith("$") else prefix
    if message.startswith("Object contains unknown field"):
        name = message.split("`")[1] if "`" in message else "?"
        field = f"{field}.{name}"
        return InvalidInput(f"{field.removeprefix('$.')}: unknown field", field=field)
    for pattern, words in _PATTERN_WORDS.items():
        if message == f"Expected `str` matching regex {pattern!r}":
            message = f"expected {words}"
    message = message[:1].lower() + message[1:]
    return InvalidInput(f"{field.removeprefix('$.')}: {message}", field=field)


def parse_metadata(data: Any, task: str | None = None, *, prefix: str = "$.metadata") -> ModelMetadata:
    """Validate decoded JSON (or a `ModelMetadata`) as a model's metadata, for `task` when known.

    Raises:
        InvalidInput: a value of the wrong type or out of its range, an unknown field, custom
            parameters too large, or a field that does not apply to the task; `field` names it.
    """
    if isinstance(data, ModelMetadata):
        meta = data
    else:
        try:
            meta = msgspec.convert(data if data is not None else {}, ModelMetadata)
        except msgspec.ValidationError as exc:
            raise validation_error(exc, prefix) from None
    check_metadata(meta, task, prefix=prefix)
    return meta


def check_metadata(meta: ModelMetadata, task: str | None, *, prefix: str = "$.metadata") -> None:
    """The checks across fields: custom parameters' size, and fields that apply only to some tasks.

    Raises:
        InvalidInput: naming the field.
    """
    size = len(msgspec.json.encode(meta.params))
    if size > MAX_PARAMS_BYTES:
        field = f"{prefix}.params"
        raise InvalidInput(
            f"{field.removeprefix('$.')}: {size} bytes of JSON, more than {MAX_PARAMS_BYTES}", field=field
        )
    if task is None:
        return
    if meta.config.vector_size is not None and task not in _EMBEDDING_TASKS:
        field = f"{prefix}.config.vector_size"
        raise InvalidInput(
            f"{field.removeprefix('$.')}: applies to embedding models ({', '.join(_EMBEDDING_TASKS)}), not {task}",
            field=field,
        )
    if meta.config.max_length is not None and task not in _TEXT_TASKS:
        field = f"{prefix}.config.max_length"
        raise InvalidInput(
            f"{field.removeprefix('$.')}: applies to models with text input ({', '.join(_TEXT_TASKS)}), not {task}",
            field=field,
        )


def effective_settings(settings: dict[str, Any], meta: ModelMetadata) -> ModelSettings:
    """The model's settings as the scheduler applies them: those set (`mm set`), then the
    metadata's `config.batch_size` and `config.device` where the settings leave them unset."""
    parsed = msgspec.convert(settings, ModelSettings)
    updates: dict[str, Any] = {}
    if parsed.max_batch_size is None and meta.config.batch_size is not None:
        updates["max_batch_size"] = meta.config.batch_size
    if parsed.device is None and meta.config.device is not None:
        updates["device"] = meta.config.device
    return msgspec.structs.replace(parsed, **updates) if updates else parsed
