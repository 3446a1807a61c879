"""The Open Inference Protocol's tensors, the same for its REST and gRPC forms: the tensor names of
each task type, the core's call from named input tensors, and output tensors from the core's result.

Every model of a task type has the same tensors (listed in its metadata):

    task       inputs                       outputs
    txt2embed  text  BYTES [n]              embedding  FP32  [n, dim]
    img2embed  image BYTES [n] (encoded)    embedding  FP32  [n, dim]
    txt2txt    text  BYTES [n]              text       BYTES [n]
    img2txt    image BYTES [n] (encoded)    text       BYTES [n]
    txt2img    text  BYTES [n]              image      BYTES [n] (PNG)

An input's shape is [n] or [n, 1]. BYTES elements arrive as raw bytes (gRPC, and REST's binary
extension: each a 4-byte little-endian length then its bytes) or as JSON strings (REST): texts
as they are; images as encoded files (PNG, JPEG, WebP), and in JSON as base64, a data URI or an
http(s) URL, as the native API takes them. Request parameters: `priority` (1 critical .. 4 low, or
a name; 0: normal), `timeout` (microseconds, as Triton's clients send it), and the task's own
(`normalize`, `max_tokens`, `temperature`, `steps`, ...).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidInput, ModelMoraError
from ...observability import TraceContext
from ...security import ANONYMOUS, Identity
from ...service import Embeddings, ImageData, Images, InferCall, InferResult, Priority, TextInput, Texts
from ...tasks import TaskType

__all__ = (
    "GRPC_PROTOCOL",
    "INPUTS",
    "OUTPUTS",
    "REST_PROTOCOL",
    "RESERVED_PARAMETERS",
    "InputTensor",
    "OutputTensor",
    "TensorSpec",
    "describe_field",
    "infer_call",
    "output_tensors",
    "pack_bytes",
    "unpack_bytes",
)

REST_PROTOCOL = "oip-rest"
"""The `protocol` label, in the metrics, of the requests that come by the REST form (`/v2`)."""
GRPC_PROTOCOL = "oip-grpc"
"""The `protocol` label of the requests that come by the gRPC form (`inference.GRPCInferenceService`)."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """-1: any size."""


INPUTS: dict[TaskType, TensorSpec] = {
    TaskType.TXT2EMBED: TensorSpec("text", "BYTES", (-1,)),
    TaskType.IMG2EMBED: TensorSpec("image", "BYTES", (-1,)),
    TaskType.TXT2TXT: TensorSpec("text", "BYTES", (-1,)),
    TaskType.IMG2TXT: TensorSpec("image", "BYTES", (-1,)),
    TaskType.TXT2IMG: TensorSpec("text", "BYTES", (-1,)),
}
OUTPUTS: dict[TaskType, TensorSpec] = {
    TaskType.TXT2EMBED: TensorSpec("embedding", "FP32", (-1, -1)),
    TaskType.IMG2EMBED: TensorSpec("embedding", "FP32", (-1, -1)),
    TaskType.TXT2TXT: TensorSpec("text", "BYTES", (-1,)),
    TaskType.IMG2TXT: TensorSpec("text", "BYTES", (-1,)),
    TaskType.TXT2IMG: TensorSpec("image", "BYTES", (-1,)),
}

RESERVED_PARAMETERS = frozenset({"priority", "timeout", "binary_data_output", "headers"})
"""Request parameters of the protocol itself, not the task's."""


@dataclass(frozen=True, slots=True)
class InputTensor:
    """An input as it arrived: `raw` (bytes) or `data` (JSON values), never both."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None
    data: Any = None


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """An output: its elements as raw bytes (`raw`), and as JSON values (`values`)."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes
    elements: list[bytes] | None = None
    """BYTES: each element's bytes (None for numbers: `raw` is the little-endian array)."""


def pack_bytes(elements: Iterable[bytes]) -> bytes:
    """BYTES elements as raw contents: each a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def unpack_bytes(raw: bytes, name: str) -> list[bytes]:
    """Raw BYTES contents as their elements.

    Raises:
        InvalidInput: the contents are not length-prefixed elements.
    """
    out, pos, view = [], 0, memoryview(raw)
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES contents end inside an element's length")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise InvalidInput(f"input {name!r}: a BYTES element of {size} bytes runs past the contents")
        out.append(bytes(view[pos : pos + size]))
        pos += size
    return out


def _flat(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for item in data for x in _flat(item)]
    return [data]


def _count(shape: list[int], name: str) -> int:
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        raise InvalidInput(f"input {name!r} must have shape [n] or [n, 1] with n >= 1, not {shape}")
    return shape[0]


def _elements(tensor: InputTensor, count: int) -> list[bytes] | list[str]:
    if tensor.raw is not None:
        elements: list[bytes] | list[str] = unpack_bytes(tensor.raw, tensor.name)
    else:
        values = _flat(tensor.data)
        if not all(isinstance(v, str) for v in values):
            raise InvalidInput(f"input {tensor.name!r}: BYTES data must be strings")
        elements = values
    if len(elements) != count:
        raise InvalidInput(f"input {tensor.name!r} has {len(elements)} elements; its shape {tensor.shape} says {count}")
    return elements


def _priority(value: Any) -> Priority:
    try:
        if isinstance(value, str):
            return Priority.parse(int(value) if value.isdigit() else value)
        if isinstance(value, int) and not isinstance(value, bool):
            return Priority.NORMAL if value == 0 else Priority(value)
    except (KeyError, ValueError):
        pass
    raise InvalidInput(f"parameter 'priority': {value!r} is not a priority (1 to 4, 0 for the default, or a name)")


def _timeout_s(value: Any) -> float:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 86_400_000_000:
        return value / 1e6
    raise InvalidInput(f"parameter 'timeout': {value!r} is not a number of microseconds in (0, 86400 s]")


def infer_call(
    model: str,
    version: str | None,
    task: TaskType,
    inputs: list[InputTensor],
    outputs: list[str],
    parameters: dict[str, Any],
    *,
    protocol: str,
    trace: TraceContext | None,
    identity: Identity = ANONYMOUS,
) -> InferCall:
    """The core's call for a request to a model of `task`, by `protocol` (`REST_PROTOCOL`,
    `GRPC_PROTOCOL`: its metrics' label), in the request's `trace` context, from `identity`.

    Raises:
        InvalidInput: a tensor or a parameter is wrong for this model.
    """
    spec = INPUTS[task]
    expect = f"model {model!r} ({task}) takes one input {spec.name!r} ({spec.datatype})"
    if len(inputs) != 1 or inputs[0].name != spec.name:
        got = ", ".join(repr(t.name) for t in inputs) or "none"
        raise InvalidInput(f"{expect}; got {got}")
    tensor = inputs[0]
    if tensor.datatype != spec.datatype:
        raise InvalidInput(f"input {spec.name!r} must be {spec.datatype}, not {tensor.datatype}")
    elements = _elements(tensor, _count(tensor.shape, tensor.name))
    output = OUTPUTS[task].name
    for name in outputs:
        if name != output:
            raise InvalidInput(f"model {model!r} ({task}) has one output {output!r}; {name!r} was asked for")
    call_inputs: TextInput | ImageData
    if spec.name == "text":
        try:
            texts = [e.decode("utf-8") if isinstance(e, bytes) else e for e in elements]
        except UnicodeDecodeError:
            raise InvalidInput(f"input {spec.name!r}: an element is not UTF-8 text") from None
        call_inputs = TextInput(texts)
    else:
        call_inputs = ImageData(list(elements))
    priority, timeout_s = Priority.NORMAL, None
    task_parameters = {}
    for key, value in parameters.items():
        if key == "priority":
            priority = _priority(value)
        elif key == "timeout":
            timeout_s = _timeout_s(value)
        elif key not in RESERVED_PARAMETERS:
            task_parameters[key] = value
    return InferCall(
        model,
        call_inputs,
        task_parameters,
        version,
        priority,
        timeout_s,
        return_mode="inline",
        protocol=protocol,
        trace=trace,
        identity=identity,
    )


def output_tensors(result: InferResult) -> list[OutputTensor]:
    """The result's output tensor."""
    name = OUTPUTS[result.task].name
    match result.output:
        case Embeddings(vectors):
            return [OutputTensor(name, "FP32", list(vectors.shape), vectors.data)]
        case Texts(texts):
            elements = [t.encode("utf-8") for t in texts]
            return [OutputTensor(name, "BYTES", [len(elements)], pack_bytes(elements), elements)]
        case Images(images):
            pngs = [i.png or b"" for i in images]
            return [OutputTensor(name, "BYTES", [len(pngs)], pack_bytes(pngs), pngs)]
    raise AssertionError(f"unknown output {result.output!r}")  # pragma: no cover


_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")
_INPUT_FIELD = re.compile(r"^\$\.input_data\.(?P<name>text|image)(?:\[(?P<index>\d+)\])?")


def describe_field(exc: ModelMoraError) -> str:
    """The error's message, led by the tensor element or parameter at fault (the core names fields
    as JSON paths of the native envelope)."""
    field = exc.field or ""
    if (m := _INPUT_FIELD.match(field)) is not None:
        where = f"input {m['name']!r}" + (f" element {m['index']}" if m["index"] is not None else "")
        return f"{where}: {exc.message}"
    if field == "$.parameters" and (u := _UNKNOWN.match(exc.message)) is not None:
        return f"parameter {u['name']!r}: not a parameter of this model's task type"
    if field.startswith("$.parameters."):
        return f"parameter {field.removeprefix('$.parameters.')!r}: {exc.message}"
    if field == "$.version":
        return f"model version: {exc.message}"
    return exc.message
