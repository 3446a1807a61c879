"""gRPC request messages to the core's calls: inputs, typed parameters, priority, deadline.

Parameters are validated by the core's own Structs (their limits and defaults are REST's); errors
name fields as the core does (JSON paths), which `errors.proto_field` turns into message paths.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import betterproto2
from grpclib.metadata import Deadline

from ..._proto.modelmora import v1
from ...errors import DeadlineExceeded, InvalidInput
from ...images import ImageRef, Pixels
from ...observability import TraceContext
from ...security import ANONYMOUS, Identity
from ...service import (
    CaptionParameters,
    EmbeddingParameters,
    GenerationParameters,
    ImageData,
    ImageGenerationParameters,
    InferCall,
    Priority,
    ReturnMode,
    TextInput,
    convert,
)
from .calls import call_trace

__all__ = ("PARAMETERS", "decode_call", "parameters_name")

PARAMETERS: dict[str, type[Any]] = {
    "embedding": EmbeddingParameters,
    "generation": GenerationParameters,
    "caption": CaptionParameters,
    "image_generation": ImageGenerationParameters,
}
"""The `parameters` oneof of InferRequest: field name -> the core's Struct."""

_RETURN: dict[int, ReturnMode] = {0: "auto", 1: "inline", 2: "url"}


def parameters_name(req: v1.InferRequest) -> str | None:
    """The name of the `parameters` oneof field that is set, if any."""
    name, _ = betterproto2.which_one_of(req, "parameters")
    return name or None


def decode_call(
    req: v1.InferRequest,
    deadline: Deadline | None,
    *,
    stream: bool = False,
    metadata: Any = None,
    identity: Identity = ANONYMOUS,
    trace: TraceContext | None = None,
) -> InferCall:
    """The core's call for one request message; `deadline` is the gRPC call's, `identity` its caller's,
    `trace` its trace context (None: from the call's `metadata`).

    Raises:
        InvalidInput: a field is wrong (named as the core names it).
        DeadlineExceeded: the call's deadline has already passed.
    """
    if not req.model_id:
        raise InvalidInput("model_id is required", field="model_id")
    if req.texts and req.images:
        raise InvalidInput("give texts or images, not both", field="$.input_data.image")
    inputs: TextInput | ImageData = (
        ImageData([_image(i, image) for i, image in enumerate(req.images)]) if req.images else TextInput(req.texts)
    )
    return InferCall(
        req.model_id,
        inputs,
        _parameters(req),
        version=req.version or None,
        priority=_priority(req.priority),
        timeout_s=_timeout_s(req.timeout_seconds, deadline),
        stream=stream,
        return_mode=_return_mode(req.return_mode),
        protocol="grpc",
        trace=trace if trace is not None else call_trace(metadata),
        identity=identity,
    )


def _parameters(req: v1.InferRequest) -> Any:
    name, message = betterproto2.which_one_of(req, "parameters")
    if not name or message is None:
        return None
    values: dict[str, Any] = {}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if value is not None and value != []:  # unset optional fields take the core's defaults
            values[f.name] = value
    return convert(values, PARAMETERS[name], "$.parameters")


def _image(index: int, image: v1.Image) -> ImageRef:
    field = f"$.input_data.image[{index}]"
    name, value = betterproto2.which_one_of(image, "source")
    if value is None:
        raise InvalidInput("no image: set encoded, raw or url", field=field)
    if name == "encoded":
        return bytes(value)
    if name == "raw":
        return Pixels(bytes(value.rgb), value.height, value.width)
    if name == "url":
        if not str(value).lower().startswith(("http://", "https://")):
            raise InvalidInput("url must be an http(s) URL", field=field + ".url")
        return str(value)
    raise InvalidInput("no image: set encoded, raw or url", field=field)


def _priority(value: int) -> Priority:
    number = int(value)
    if number == 0:
        return Priority.NORMAL
    try:
        return Priority(number)
    except ValueError:
        raise InvalidInput(f"unknown priority {number} (expected 1-4)", field="$.priority") from None


def _return_mode(value: int) -> ReturnMode:
    mode = _RETURN.get(int(value))
    if mode is None:
        raise InvalidInput(f"unknown return mode {int(value)} (expected 0-2)", field="$.return")
    return mode


def _timeout_s(timeout_seconds: float | None, deadline: Deadline | None) -> float | None:
    """The request's timeout: the earlier of the message's and the call's deadline (None: neither)."""
    if timeout_seconds is not None and not timeout_seconds > 0:
        raise InvalidInput(f"timeout_seconds must be > 0 (got {timeout_seconds})", field="$.timeout_seconds")
    if deadline is None:
        return timeout_seconds
    remaining = deadline.time_remaining()
    if remaining <= 0:
        raise DeadlineExceeded("the call's deadline passed before the request was queued")
    return remaining if timeout_seconds is None else min(timeout_seconds, remaining)
