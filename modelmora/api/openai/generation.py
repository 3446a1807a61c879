"""Text generation for `/v1/completions` and `/v1/chat/completions`: the core calls of one request
(prompts x `n` choices), then its answer as one JSON body or as server-sent event chunks.

`n` choices of a prompt are `n` items of one call, so they batch together; with a `seed`, choice j
runs with seed + j in a call of its own (one seed per call), so the choices differ and each is
reproducible. Choice indexes go prompt by prompt: prompt p's choices are p*n ... p*n + n - 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectSendStream
from starlette.types import Receive

from ...errors import ModelMoraError
from ...service import InferCall, InferenceService, InferResult, InferStream, StreamEvent, TextInput, Texts
from .calls import Emit, EventStream, Options, infer_all
from .errors import Fields, openai_error
from .schemas import Usage

__all__ = ("Generation", "Shape", "event_stream", "open_streams", "plan", "respond")

log = structlog.get_logger("modelmora.api.openai")

_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Generation:
    """The core calls of one request, and the choice index of each call's items."""

    calls: list[InferCall]
    choices: list[list[int]]
    """choices[c][i]: the choice index of item i of call c."""
    n: int
    fields: Fields


def plan(
    model: str, prompts: list[str], n: int, params: dict[str, Any], opts: Options, inputs_field: str, indexed: bool
) -> Generation:
    """The calls for `prompts` with `n` choices each (`params`: the core's GenerationParameters as a dict)."""
    seed = params.get("seed")

    def call(texts: list[str], extra: dict[str, Any]) -> InferCall:
        return opts.call(model, TextInput(texts), {**params, **extra})

    if seed is None or n == 1:
        texts = [p for p in prompts for _ in range(n)]
        item = (lambda i: i // n) if indexed else (lambda i: None)
        return Generation([call(texts, {})], [list(range(len(texts)))], n, Fields(inputs_field, item))
    calls = [call(prompts, {"seed": seed + j}) for j in range(n)]
    choices = [[p * n + j for p in range(len(prompts))] for j in range(n)]
    return Generation(calls, choices, n, Fields(inputs_field, (lambda i: i) if indexed else (lambda i: None)))


class Shape(Protocol):
    """How one endpoint writes choices: whole (`choice`) or as chunks (`opening`, `delta`, `finish`)."""

    object: str
    chunk_object: str

    def choice(self, index: int, text: str, reason: str) -> Any: ...

    def opening(self, index: int) -> dict[str, Any] | None: ...

    def delta(self, index: int, text: str) -> dict[str, Any]: ...

    def finish(self, index: int, reason: str) -> dict[str, Any]: ...


def _usage(gen: Generation, results: Sequence[InferResult]) -> Usage:
    prompt = completion = 0
    for c, result in enumerate(results):
        out = result.output
        assert isinstance(out, Texts)
        for i, choice in enumerate(gen.choices[c]):
            if choice % gen.n == 0 and out.prompt_tokens is not None:
                prompt += out.prompt_tokens[i]  # a prompt counts once, whatever its choices
            if out.completion_tokens is not None:
                completion += out.completion_tokens[i]
    return Usage(prompt, completion, prompt + completion)


def _id(shape: Shape) -> str:
    return ("chatcmpl-" if shape.object == "chat.completion" else "cmpl-") + uuid.uuid4().hex


async def respond(
    service: InferenceService, gen: Generation, shape: Shape, model: str, receive: Receive
) -> dict[str, Any]:
    """Run the calls to their results; the whole answer."""
    try:
        results = await infer_all(service, gen.calls, receive)
    except ModelMoraError as exc:
        raise gen.fields.rename(exc) from None
    choices: list[Any] = [None] * sum(len(c) for c in gen.choices)
    for c, result in enumerate(results):
        out = result.output
        assert isinstance(out, Texts)
        for i, index in enumerate(gen.choices[c]):
            choices[index] = shape.choice(index, out.texts[i], out.finish_reasons[i])
    return {
        "id": _id(shape),
        "object": shape.object,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(gen, results),
    }


async def open_streams(service: InferenceService, gen: Generation) -> list[InferStream]:
    """Queue every call as a stream (errors before anything runs are raised here, as JSON errors)."""
    streams: list[InferStream] = []
    try:
        for call in gen.calls:
            streams.append(await service.open_stream(dataclasses.replace(call, stream=True)))
    except ModelMoraError as exc:
        for s in streams:
            await s.aclose()
        raise gen.fields.rename(exc) from None
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    return streams


def _sse(data: Any) -> bytes:
    return b"data: " + _encoder.encode(data) + b"\n\n"


_Item = tuple[int, StreamEvent | InferResult | BaseException]


async def _pump(c: int, stream: InferStream, out: MemoryObjectSendStream[_Item]) -> None:
    async with out:
        try:
            async for item in stream:
                await out.send((c, item))
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            with contextlib.suppress(anyio.BrokenResourceError):  # the reader may have stopped
                await out.send((c, exc))


def event_stream(
    streams: list[InferStream], gen: Generation, shape: Shape, model: str, include_usage: bool
) -> EventStream:
    """The chunks of every choice as their tokens come, each choice's last chunk with its finish reason,
    the usage chunk when asked for, then `[DONE]`. An error after the start is one `{"error": ...}`
    event (the other calls stop), then `[DONE]`."""
    head = {"id": _id(shape), "object": shape.chunk_object, "created": int(time.time()), "model": model}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _sse({**head, "choices": choices, **extra})

    async def produce(emit: Emit) -> None:
        results: list[InferResult | None] = [None] * len(streams)
        failed = False
        try:
            for index in sorted(i for c in gen.choices for i in c):
                opening = shape.opening(index)
                if opening is not None:
                    await emit(chunk([opening]))
            send, receive = anyio.create_memory_object_stream[_Item](math.inf)
            async with anyio.create_task_group() as tg, receive:
                for c, stream in enumerate(streams):
                    tg.start_soon(_pump, c, stream, send.clone())
                send.close()
                async for c, item in receive:
                    if isinstance(item, StreamEvent):
                        if item.kind == "token":
                            await emit(chunk([shape.delta(gen.choices[c][item.data["index"]], item.data["text"])]))
                    elif isinstance(item, InferResult):
                        results[c] = item
                        out = item.output
                        assert isinstance(out, Texts)
                        for i, index in enumerate(gen.choices[c]):
                            await emit(chunk([shape.finish(index, out.finish_reasons[i])]))
                    else:
                        failed = True
                        await emit(_sse(_error_body(item, gen.fields)))
                        tg.cancel_scope.cancel()
                        break
            if include_usage and not failed:
                usage = _usage(gen, [r for r in results if r is not None])
                await emit(chunk([], usage=usage))
            await emit(b"data: [DONE]\n\n")
        finally:
            with anyio.CancelScope(shield=True):
                for stream in streams:
                    await stream.aclose()  # the client went away: queued calls leave, running ones stop

    return EventStream(produce)


def _error_body(exc: BaseException, fields: Fields) -> Any:
    if isinstance(exc, ModelMoraError):
        return openai_error(fields.rename(exc))[1]
    trace_id = uuid.uuid4().hex
    log.error("unhandled_error", trace_id=trace_id, exc_info=exc)
    return {
        "error": {
            "message": f"internal error (trace id {trace_id})",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
