# ruff: noqa: ASYNC109  (`timeout` is the call's gRPC deadline, the name grpclib and grpcio use)
"""Many requests over one bidirectional stream (`InferStream`): `StreamRequest`s in, a
`StreamAnswer` per request out, in completion order.

    requests = [StreamRequest.embed(f"r{i}", "all-MiniLM-L6-v2", text) for i, text in enumerate(texts)]
    async for answer in mm.infer_stream(requests):
        rows[answer.request_id] = answer.value()  # raises the request's ClientError, if it failed

Each request carries its own model, task, priority and timeout; one that fails is answered with its
error and the stream goes on. The call is never retried (its requests may have run); leaving the
loop early cancels it, which withdraws the requests still queued on the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from grpclib.client import Stream
from grpclib.const import Cardinality, Status

from .._proto.modelmora import v1
from . import _requests as req
from ._calls import ClientCalls, cancel_requests, optional, take_back
from ._convert import error_for, from_exception, infer_result
from ._requests import ImageInput, PriorityName, ReturnMode
from .errors import ClientError
from .results import ImageResult, TextResult

__all__ = ("StreamAnswer", "StreamMethods", "StreamRequest")

_PATH = "/modelmora.v1.InferenceService/InferStream"


def _tagged(message: v1.InferRequest, request_id: str, timeout_s: float | None) -> v1.InferRequest:
    if not request_id:
        raise req.refuse("give each stream request an id", "request_id")
    if timeout_s is not None and not timeout_s > 0:
        raise req.refuse(f"must be > 0 (got {timeout_s})", "timeout_seconds")
    message.request_id = request_id
    message.timeout_seconds = timeout_s
    return message


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """One request of an `infer_stream` call, made by the constructor of its task: `embed`,
    `generate`, `caption` or `generate_image` (their arguments are those of the client's methods of
    the same name, plus the request's id, unique among the stream's requests in flight, and its own
    `timeout_s`)."""

    request_id: str
    message: v1.InferRequest

    @classmethod
    def embed(
        cls,
        request_id: str,
        model: str,
        texts: str | Sequence[str] | None = None,
        *,
        images: ImageInput | Sequence[ImageInput] | None = None,
        normalize: bool = False,
        version: str | None = None,
        priority: int | PriorityName | None = None,
        timeout_s: float | None = None,
    ) -> StreamRequest:
        message = req.embed_request(model, texts, images, normalize, version, priority)
        return cls(request_id, _tagged(message, request_id, timeout_s))

    @classmethod
    def generate(
        cls,
        request_id: str,
        model: str,
        prompt: str | Sequence[str],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        version: str | None = None,
        priority: int | PriorityName | None = None,
        timeout_s: float | None = None,
    ) -> StreamRequest:
        params = optional(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
        message = req.generation_request(model, prompt, version, priority, params)
        return cls(request_id, _tagged(message, request_id, timeout_s))

    @classmethod
    def caption(
        cls,
        request_id: str,
        model: str,
        images: ImageInput | Sequence[ImageInput],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        version: str | None = None,
        priority: int | PriorityName | None = None,
        timeout_s: float | None = None,
    ) -> StreamRequest:
        params = optional(max_tokens=max_tokens, temperature=temperature, seed=seed)
        message = req.caption_request(model, images, version, priority, params)
        return cls(request_id, _tagged(message, request_id, timeout_s))

    @classmethod
    def generate_image(
        cls,
        request_id: str,
        model: str,
        prompt: str | Sequence[str],
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        negative_prompt: str | None = None,
        return_mode: ReturnMode = "auto",
        version: str | None = None,
        priority: int | PriorityName | None = None,
        timeout_s: float | None = None,
    ) -> StreamRequest:
        params = optional(
            steps=steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            seed=seed,
            negative_prompt=negative_prompt,
        )
        message = req.image_request(model, prompt, version, priority, return_mode, params)
        return cls(request_id, _tagged(message, request_id, timeout_s))


@dataclass(frozen=True, slots=True)
class StreamAnswer:
    """The answer to one `StreamRequest`: its result (embeddings as a float32 array, a
    `TextResult` or an `ImageResult`, as the direct call returns them) or its error."""

    request_id: str
    result: np.ndarray | TextResult | ImageResult | None
    error: ClientError | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def value(self) -> np.ndarray | TextResult | ImageResult:
        """The result; raises the request's `ClientError` if it failed."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _answer(message: v1.InferStreamResponse) -> StreamAnswer:
    if message.error is not None:
        e = message.error
        try:
            status = Status(e.status)
        except ValueError:
            status = Status.UNKNOWN
        error = error_for(status, e.message, code=e.code or None, field=e.field or None, retry_after_s=e.retry_after_s)
        return StreamAnswer(message.request_id, None, error)
    if message.response is None:
        error = error_for(Status.INTERNAL, f"the server answered request {message.request_id!r} with nothing")
        return StreamAnswer(message.request_id, None, error)
    return StreamAnswer(message.request_id, infer_result(message.response), None)


async def _send(
    stream: Stream[v1.InferRequest, v1.InferStreamResponse],
    requests: Iterable[StreamRequest] | AsyncIterable[StreamRequest],
) -> None:
    """Send each request as it comes, then half-close (the requests sent finish on the server)."""

    async def each() -> AsyncIterator[StreamRequest]:
        if isinstance(requests, AsyncIterable):
            async for item in requests:
                yield item
        else:
            for item in requests:
                yield item

    async for item in each():
        if not isinstance(item, StreamRequest):
            raise TypeError(f"infer_stream takes StreamRequest items, not {type(item).__name__}")
        await stream.send_message(item.message)
    await stream.end()


class StreamMethods(ClientCalls):
    """`infer_stream`, for `AsyncClient`."""

    async def infer_stream(
        self,
        requests: Iterable[StreamRequest] | AsyncIterable[StreamRequest],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> AsyncIterator[StreamAnswer]:
        """Send `requests` over one stream as they come (from a list, a generator or an async
        iterator) and yield each one's `StreamAnswer` as it is ready, in completion order; ends
        when every request sent is answered. `timeout` is the whole stream's deadline.

        Raises:
            ClientError: the call itself failed (no server, deadline passed, lost connection); the
                answers yielded before stand.
            TypeError: an item of `requests` is not a `StreamRequest` (the call is cancelled).
        """
        deadline, md = self._options(timeout, metadata)
        channel = self._get_channel()
        stream = channel.request(
            _PATH, Cardinality.STREAM_STREAM, v1.InferRequest, v1.InferStreamResponse, deadline=deadline, metadata=md
        )
        sender: asyncio.Future[None] | None = None
        try:
            async with stream:
                await stream.send_request()
                sender = asyncio.ensure_future(_send(stream, requests))
                while True:
                    task, cancels = cancel_requests()  # each step may run in another task (Client)
                    receive = asyncio.ensure_future(stream.recv_message())
                    await asyncio.wait({receive, sender}, return_when=asyncio.FIRST_COMPLETED)
                    if sender.done() and sender.exception() is not None and not receive.done():
                        receive.cancel()
                        await asyncio.gather(receive, return_exceptions=True)
                        sender.result()  # the caller's iterator failed: raise its error
                    try:
                        message = await receive
                    except Exception:
                        take_back(task, cancels)
                        raise
                    if message is None:
                        break
                    yield _answer(message)
        except Exception as exc:
            error = from_exception(exc, stream.trailing_metadata)
            if error is None or error is exc:
                raise
            raise error from exc
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
