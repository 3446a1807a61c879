"""Wire messages between the supervisor and a worker: one versioned tagged union.

Both sides import this module. Control messages travel as msgpack frames on the worker's
socket pair (see `control`); bulk bytes (texts, tensors, images) never do: a message only
carries `Span` descriptors pointing into a shared-memory ring or a large segment.

All messages are `array_like` (compact, positional). Schema evolution: new fields are
appended with defaults; bump `PROTOCOL_VERSION` on any incompatible change. The worker
announces its version in `Hello` and the supervisor refuses a mismatch.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

__all__ = (
    "PROTOCOL_VERSION",
    "Arrays",
    "Blobs",
    "Cancel",
    "Error",
    "ErrorCode",
    "Event",
    "Heartbeat",
    "Hello",
    "Infer",
    "Load",
    "Loaded",
    "Message",
    "Phase",
    "Result",
    "Shutdown",
    "Span",
    "Tensor",
    "Text",
    "split",
)

PROTOCOL_VERSION = 6
"""2: Cancel; 3: Arrays, Blobs, Event, non-tensor outputs; 4: Load.streams; 5: Heartbeat, Phase,
typed `Loaded` fields, `ErrorCode`, `Load.heartbeat_s` (and no `Load.options`); 6: `Infer.trace_ids`."""


class Span(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Where a payload lies: `seg` is "" for the sender's ring, else a large segment's name."""

    seg: str
    start: int
    nbytes: int


class Text(msgspec.Struct, tag="text", array_like=True, frozen=True, gc=False):
    """A list of strings: their UTF-8 bytes back to back in `span`, split by `lengths`."""

    span: Span
    lengths: list[int]


class Tensor(msgspec.Struct, tag="tensor", array_like=True, frozen=True, gc=False):
    """A dense C-contiguous array: numpy dtype string (e.g. "<f4") and shape."""

    span: Span
    dtype: str
    shape: tuple[int, ...]


class Arrays(msgspec.Struct, tag="arrays", array_like=True, frozen=True, gc=False):
    """Several dense arrays of one dtype back to back in `span` (e.g. images of different sizes)."""

    span: Span
    dtype: str
    shapes: list[tuple[int, ...]]


class Blobs(msgspec.Struct, tag="blobs", array_like=True, frozen=True, gc=False):
    """A list of byte strings (e.g. encoded images) back to back in `span`, split by `lengths`."""

    span: Span
    lengths: list[int]


Input = Text | Tensor | Arrays | Blobs


def split(raw: bytes, lengths: list[int]) -> list[bytes]:
    """Cut the bytes of a `Text` or `Blobs` payload back into its items."""
    out, pos = [], 0
    for n in lengths:
        out.append(raw[pos : pos + n])
        pos += n
    return out


# -- supervisor -> worker -----------------------------------------------------------------


class Load(msgspec.Struct, tag="load", array_like=True, frozen=True):
    """First message to a worker: attach the segment and load the model."""

    segment: str
    request_ring_bytes: int
    response_ring_bytes: int
    model_id: str
    version: str
    path: str
    task: str
    pipeline: str
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 1
    streams: int = 1
    """Batches the worker may run at once, each on its own thread (pipelines that declare
    `concurrent`; others run one at a time): alone on `threads` torch threads, beside others on
    threads // streams; 0: 2 on a GPU, 1 on a CPU. `Loaded.streams` says how many it runs."""
    heartbeat_s: float = 0.0
    """Send a `Heartbeat` this often from a thread of its own, from now until exit; 0: never."""


class Infer(msgspec.Struct, tag="infer", array_like=True, frozen=True, gc=False):
    """Run one batch. Inputs are in the request ring (or a large segment)."""

    batch_id: int
    inputs: dict[str, Input]
    params: dict[str, Any] = {}
    trace_ids: list[str] = []
    """The W3C trace ids of the batch's requests (32 hex digits each), for the worker's log lines."""


class Cancel(msgspec.Struct, tag="cancel", array_like=True, frozen=True, gc=False):
    """Nobody waits for this batch any more: stop it at the pipeline's next step."""

    batch_id: int


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True, frozen=True):
    """Finish the current batch and exit."""


# -- worker -> supervisor -----------------------------------------------------------------


class Hello(msgspec.Struct, tag="hello", array_like=True, frozen=True):
    """First message from a worker."""

    protocol: int
    pid: int


class Loaded(msgspec.Struct, tag="loaded", array_like=True, frozen=True):
    """The model is loaded and its test inference passed."""

    load_ms: float
    """Constructing the pipeline (reading the weights)."""
    warmup_ms: float
    """The test inference."""
    rss_bytes: int
    device: str
    import_ms: float = 0.0
    """The preloaded libraries and the pipeline's module (near zero in a forked worker)."""
    forked: bool = False
    """Whether the worker is a fork of the zygote."""
    vram_bytes: int = 0
    """GPU memory the worker holds once loaded; 0 on the CPU."""
    streams: int = 1
    """Batches the worker runs at once."""


class Result(msgspec.Struct, tag="result", array_like=True, frozen=True, gc=False):
    """Outputs of one batch, in the response ring."""

    batch_id: int
    outputs: dict[str, Input]
    infer_ms: float
    vram_bytes: int = 0
    """GPU memory the worker's process holds after the batch (torch's reserved pool); 0 on CPU."""


class Event(msgspec.Struct, tag="event", array_like=True, frozen=True, gc=False):
    """Something happened while a batch runs (a generated token, a diffusion step).

    `item` is the input's index in the batch, or -1 for every input of the batch.
    """

    batch_id: int
    item: int
    kind: str
    data: dict[str, Any]


class Phase(msgspec.Struct, tag="phase", array_like=True, frozen=True):
    """Where the worker's load stands, before `Loaded`: "warming" once the weights are loaded and
    the test inference starts."""

    phase: str


class Heartbeat(msgspec.Struct, tag="heartbeat", array_like=True, frozen=True, gc=False):
    """The worker's process runs (sent every `Load.heartbeat_s` by a thread that keeps going while
    the pipeline computes). A worker that sends no message at all for a while is stalled."""


class ErrorCode(enum.StrEnum):
    """Why a batch or the load failed, as the worker reports it in `Error.code`."""

    MODEL_LOAD_FAILED = "model_load_failed"
    """Loading the pipeline or its test inference raised (batch_id -1)."""
    INVALID_INPUT = "invalid_input"
    """The pipeline refused the inputs (`InputError`); `Error.field` names the input."""
    INFERENCE_FAILED = "inference_failed"
    """The pipeline raised, or returned outputs the protocol cannot carry."""
    CANCELLED = "cancelled"
    """The batch stopped at a pipeline step after a `Cancel`."""
    RESULT_TOO_LARGE = "result_too_large"
    """An output exceeds the response ring."""


class Error(msgspec.Struct, tag="error", array_like=True, frozen=True):
    """A batch (or, with batch_id -1, the load) failed inside the worker."""

    batch_id: int
    code: ErrorCode
    message: str
    field: str = ""


Message = Load | Infer | Cancel | Shutdown | Hello | Loaded | Result | Event | Phase | Heartbeat | Error
