# ruff: noqa: ASYNC109  (`timeout` is the call's gRPC deadline, the name grpclib and grpcio use)
"""`AsyncClient`: ModelMora over gRPC from asyncio code (grpclib, over the generated stubs).

    async with AsyncClient("127.0.0.1:50051", timeout=30) as mm:
        vectors = await mm.embed("all-MiniLM-L6-v2", ["hello", "world"], normalize=True)
        async for event in mm.generate_stream("gpt2", "Once upon a time", max_tokens=40):
            ...

One HTTP/2 connection, opened at the first call and shared by concurrent calls. Each call has a
deadline (`timeout`, seconds, for all its attempts together; the client's default, else none: the
server's default for the task type), metadata (the client's merged with the call's), and retries
of UNAVAILABLE (`RetryPolicy`; `retry` documents which calls are retried when). asyncio only:
from trio or threads, use the blocking `Client`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from ssl import SSLContext
from types import TracebackType
from typing import Any, TypeVar, cast

import numpy as np
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.metadata import Deadline

from .._proto.modelmora import v1
from . import _requests as req
from ._calls import Attempt, cancel_requests, optional, split_target, take_back
from ._convert import embeddings, error_for, from_exception, image_result, text_result
from ._requests import ImageInput, PriorityName, ReturnMode
from .credentials import auth_metadata, tls_context
from .jobs import JobMethods
from .manage import ManageMethods
from .results import ImageResult, Progress, TextResult, Token
from .retry import RetryPolicy
from .stream import StreamMethods

__all__ = ("DEFAULT_TARGET", "AsyncClient")

DEFAULT_TARGET = "127.0.0.1:50051"
log = logging.getLogger("modelmora.client")
T = TypeVar("T")
E = TypeVar("E")


class AsyncClient(JobMethods, ManageMethods, StreamMethods):
    """ModelMora's gRPC API for asyncio code.

    Args:
        target: the server's gRPC address, host:port.
        timeout: the default deadline of each call, in seconds (None: the server's per-task default).
        retry: how UNAVAILABLE is retried (`RetryPolicy(max_attempts=1)`: never).
        metadata: sent with every call.
        ssl: True (the system's trust store) or an `ssl.SSLContext` for TLS.
        token: the bearer token (None: `MODELMORA_TOKEN`; "": none); never shown or logged.
        ca_file, cert_file, key_file: TLS with this CA and, for mutual TLS, this client certificate
            (None: `MODELMORA_CA_FILE`, `MODELMORA_CLIENT_CERT`, `MODELMORA_CLIENT_KEY`); any given
            turns TLS on.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        metadata: Mapping[str, str] | None = None,
        ssl: bool | SSLContext = False,
        token: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        self.host, self.port = split_target(target)
        self.target = target
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self.metadata = dict(metadata or {})
        self._auth = auth_metadata(token)
        self._ssl = tls_context(ssl, ca_file, cert_file, key_file)
        self._channel: Channel | None = None
        self._closed = False

    # -- connection ---------------------------------------------------------------------------

    def _get_channel(self) -> Channel:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._channel is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "AsyncClient needs a running asyncio event loop (grpclib); elsewhere use modelmora.client.Client"
                ) from None
            self._channel = Channel(self.host, self.port, ssl=self._ssl)
        return self._channel

    async def close(self) -> None:
        """Close the connection; calls made afterwards raise RuntimeError."""
        self._closed = True
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the call machinery -------------------------------------------------------------------

    def _options(
        self, timeout: float | None, metadata: Mapping[str, str] | None
    ) -> tuple[Deadline | None, dict[str, str] | None]:
        seconds = self.timeout if timeout is None else timeout
        deadline = Deadline.from_timeout(seconds) if seconds is not None else None
        merged = {**self._auth, **self.metadata, **(metadata or {})}
        return deadline, merged or None

    def _next_delay(self, exc: Exception, attempt: Attempt, number: int, name: str, **how: Any) -> float:
        """The wait before the next attempt; raises the call's `ClientError` when there is none."""
        error = from_exception(exc, attempt.trailers, number)
        if error is None:
            raise exc
        delay = self.retry.delay_s(error, number, sent=attempt.sent, **how)
        if delay is None:
            if error is exc:
                raise exc
            raise error from exc
        log.warning(
            "%s failed (%s: %s); retry %d of %d in %.3f s",
            name,
            error.status.name,
            error.message,
            number,
            self.retry.max_attempts - 1,
            delay,
            extra={"method": name, "attempt": number, "delay_s": delay, "sent": attempt.sent},
        )
        return delay

    async def _unary(
        self,
        name: str,
        call: Callable[[Channel, Deadline | None, dict[str, str] | None], Awaitable[T]],
        *,
        idempotent: bool,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
    ) -> T:
        deadline, md = self._options(timeout, metadata)
        number = 0
        while True:
            number += 1
            attempt = Attempt(self._get_channel())
            task, cancels = cancel_requests()
            try:
                return await call(cast(Channel, attempt), deadline, md)
            except Exception as exc:
                take_back(task, cancels)
                delay = self._next_delay(exc, attempt, number, name, idempotent=idempotent, deadline=deadline)
            await asyncio.sleep(delay)

    async def _generate(
        self,
        request: v1.InferRequest,
        convert: Callable[[v1.GenerateEvent], E],
        *,
        idempotent: bool,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
    ) -> AsyncIterator[E]:
        """A Generate call's events; retried (when allowed) only before its first event."""
        deadline, md = self._options(timeout, metadata)
        number = 0
        while True:
            number += 1
            attempt = Attempt(self._get_channel())
            stub = v1.InferenceServiceStub(cast(Channel, attempt))
            events = cast(AsyncGenerator[v1.GenerateEvent], stub.generate(request, deadline=deadline, metadata=md))
            received = False
            try:
                while True:
                    task, cancels = cancel_requests()  # each step may run in another task (Client)
                    try:
                        event = await anext(events)
                    except StopAsyncIteration:
                        return
                    except Exception:
                        take_back(task, cancels)
                        raise
                    received = True
                    yield convert(event)
            except Exception as exc:
                how = {"idempotent": idempotent and not received, "deadline": deadline}
                delay = self._next_delay(exc, attempt, number, "Generate", **how)
            finally:
                await events.aclose()  # stops the call (RST_STREAM) when the caller leaves early
            await asyncio.sleep(delay)

    async def _infer(
        self, request: v1.InferRequest, *, idempotent: bool, timeout: float | None, metadata: Mapping[str, str] | None
    ) -> v1.InferResponse:
        async def call(channel: Channel, deadline: Deadline | None, md: dict[str, str] | None) -> v1.InferResponse:
            return await v1.InferenceServiceStub(channel).infer(request, deadline=deadline, metadata=md)

        return await self._unary("Infer", call, idempotent=idempotent, timeout=timeout, metadata=metadata)

    # -- inference ----------------------------------------------------------------------------

    async def embed(
        self,
        model: str,
        texts: str | Sequence[str] | None = None,
        *,
        images: ImageInput | Sequence[ImageInput] | None = None,
        normalize: bool = False,
        version: str | None = None,
        priority: int | PriorityName | None = None,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> np.ndarray:
        """Embeddings of `texts` (txt2embed) or `images` (img2embed): a float32 array of one row per
        input (a single text or image gives one row), unit-length rows when `normalize`."""
        request = req.embed_request(model, texts, images, normalize, version, priority)
        return embeddings(await self._infer(request, idempotent=True, timeout=timeout, metadata=metadata))

    async def generate(
        self,
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
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> TextResult:
        """Text generation (txt2txt): one text per prompt. Unset parameters take the server's
        defaults (max_tokens 64, temperature 1.0: sampling; 0: greedy)."""
        params = optional(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
        request = req.generation_request(model, prompt, version, priority, params)
        return text_result(await self._infer(request, idempotent=True, timeout=timeout, metadata=metadata))

    def generate_stream(
        self,
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
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> AsyncIterator[Token | TextResult]:
        """`generate` as it happens: a `Token` per piece of new text (`index`: which prompt), then
        the `TextResult`. Leaving the loop early stops the generation on the server."""
        params = optional(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
        request = req.generation_request(model, prompt, version, priority, params)

        def convert(event: v1.GenerateEvent) -> Token | TextResult:
            if event.token is not None:
                return Token(event.token.index, event.token.text)
            if event.result is not None:
                return text_result(event.result)
            raise error_for(Status.INTERNAL, "the server sent an event of another task type")

        return self._generate(request, convert, idempotent=True, timeout=timeout, metadata=metadata)

    async def caption(
        self,
        model: str,
        images: ImageInput | Sequence[ImageInput],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        version: str | None = None,
        priority: int | PriorityName | None = None,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> TextResult:
        """Captions (img2txt): one text per image (default greedy, max_tokens 30)."""
        params = optional(max_tokens=max_tokens, temperature=temperature, seed=seed)
        request = req.caption_request(model, images, version, priority, params)
        return text_result(await self._infer(request, idempotent=True, timeout=timeout, metadata=metadata))

    async def generate_image(
        self,
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
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ImageResult:
        """Image generation (txt2img): one image per prompt, as PNG bytes (`return_mode="inline"`) or
        a result-store URL ("url"; "auto": the server's choice). Not idempotent: retried only when
        the request never left (see `retry`)."""
        params = optional(
            steps=steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            seed=seed,
            negative_prompt=negative_prompt,
        )
        request = req.image_request(model, prompt, version, priority, return_mode, params)
        return image_result(await self._infer(request, idempotent=False, timeout=timeout, metadata=metadata))

    def generate_image_stream(
        self,
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
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> AsyncIterator[Progress | ImageResult]:
        """`generate_image` as it happens: a `Progress` per denoising step, then the `ImageResult`."""
        params = optional(
            steps=steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            seed=seed,
            negative_prompt=negative_prompt,
        )
        request = req.image_request(model, prompt, version, priority, return_mode, params)

        def convert(event: v1.GenerateEvent) -> Progress | ImageResult:
            if event.progress is not None:
                return Progress(event.progress.index, event.progress.step, event.progress.steps)
            if event.result is not None:
                return image_result(event.result)
            raise error_for(Status.INTERNAL, "the server sent an event of another task type")

        return self._generate(request, convert, idempotent=False, timeout=timeout, metadata=metadata)
