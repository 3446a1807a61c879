"""What the OpenAI endpoints share: our options (priority, timeout, version) from extra body fields
or headers, the body decoder, running several core calls as one request, and the server-sent
event response."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import msgspec
from starlette.types import Receive, Scope, Send

from ...errors import ClientGone, InvalidInput, ModelMoraError
from ...observability import TraceContext
from ...registry import ModelRecord
from ...security import ANONYMOUS, Identity
from ...service import InferCall, InferenceService, InferResult, Priority, ReturnMode
from ...tasks import TaskType
from ..rest.body import decode, read_body
from ..rest.edge import identity_of, trace_of

__all__ = (
    "PRIORITY_HEADER",
    "PROTOCOL",
    "TIMEOUT_HEADER",
    "VERSION_HEADER",
    "EventStream",
    "Options",
    "first_error",
    "infer_all",
    "options",
    "read_request",
    "served_model",
    "until_disconnect",
)

T = TypeVar("T")

_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")

PROTOCOL = "openai"
"""The `protocol` label of this front end's requests in the metrics."""
PRIORITY_HEADER = "x-modelmora-priority"
"""A request's priority class: 1 (critical) to 4 (low), or its name (the body's `priority` wins)."""
TIMEOUT_HEADER = "x-modelmora-timeout-seconds"
"""A request's deadline in seconds (the body's `timeout_seconds` wins)."""
VERSION_HEADER = "x-modelmora-version"
"""A model version (the body's `version` wins)."""


@dataclass(frozen=True, slots=True)
class Options:
    """What every core call of one request shares: our options, the request's trace context and
    its caller."""

    priority: Priority
    timeout_s: float | None
    version: str | None
    trace: TraceContext | None = None
    identity: Identity = ANONYMOUS

    def call(self, model: str, inputs: Any, parameters: Any, return_mode: ReturnMode = "auto") -> InferCall:
        """The core's call for `inputs`, labelled with this front end's protocol."""
        return InferCall(
            model,
            inputs,
            parameters,
            self.version,
            self.priority,
            self.timeout_s,
            return_mode=return_mode,
            protocol=PROTOCOL,
            trace=self.trace,
            identity=self.identity,
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1").strip()
    return None


def options(scope: Scope, body: Any) -> Options:
    """Priority, timeout and version: the body's extra fields, else our headers.

    Raises:
        InvalidInput: a header's value is not valid (the body's are checked by its decoder).
    """
    priority = body.priority
    if priority is None and (text := _header(scope, PRIORITY_HEADER.encode())) is not None:
        try:
            priority = int(text) if text.isdigit() else text
            parsed = Priority.parse(priority)
        except (KeyError, ValueError):
            raise InvalidInput(
                f"header {PRIORITY_HEADER}: {text!r} is not a priority (1 to 4, or critical, high, normal, low)"
            ) from None
    else:
        parsed = Priority.NORMAL if priority is None else Priority.parse(priority)
    timeout_s = body.timeout_seconds
    if timeout_s is None and (text := _header(scope, TIMEOUT_HEADER.encode())) is not None:
        try:
            timeout_s = float(text)
        except ValueError:
            timeout_s = -1.0
        if not 0 < timeout_s <= 86400:
            raise InvalidInput(f"header {TIMEOUT_HEADER}: {text!r} is not a number of seconds in (0, 86400]")
    version = body.version or _header(scope, VERSION_HEADER.encode()) or None
    return Options(parsed, timeout_s, version, trace_of(scope), identity_of(scope))


async def read_request(
    scope: Scope, receive: Receive, decoder: msgspec.json.Decoder[T], service: InferenceService
) -> T:
    """The decoded JSON body (400/413/415 as the native API, fields named as JSON paths of this body;
    an unknown field is named itself). A refusal is counted here, as the native API counts one: the
    core never sees the request."""
    settings = service.settings
    t0 = time.perf_counter()
    try:
        body = await read_body(scope, receive, settings.max_body_bytes, settings.body_read_timeout_s)
        return decode(decoder, body)
    except ModelMoraError as exc:
        if isinstance(exc, InvalidInput) and exc.field is not None and (m := _UNKNOWN.match(exc.message)):
            exc.field = f"{exc.field}.{m['name']}"
        service.record.failed("", "", PROTOCOL, exc, time.perf_counter() - t0, trace_of(scope))
        raise


async def served_model(
    service: InferenceService, model_id: str, tasks: Sequence[TaskType], endpoint: str
) -> ModelRecord:
    """The model's record when its task type is one of `tasks`.

    Raises:
        ModelNotFound: it is not installed.
        InvalidInput: its task type is not served by this endpoint (field `$.model`).
    """
    rec = await service.cached_model(model_id)
    if rec.task not in tasks:
        served = " and ".join(str(t) for t in tasks)
        raise InvalidInput(
            f"model {model_id!r} is a {rec.task} model; {endpoint} serves {served} models", field="$.model"
        )
    return rec


async def until_disconnect(receive: Receive) -> None:
    """Return when the client goes away (the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first error in a (nested) exception group, preferring one of ours."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return next((e for e in leaves if isinstance(e, ModelMoraError)), leaves[0])


async def infer_all(service: InferenceService, calls: Sequence[InferCall], receive: Receive) -> list[InferResult]:
    """Run the calls of one request concurrently; all of them are withdrawn when the client goes away
    (`ClientGone`) or one fails (its error is raised)."""
    if len(calls) == 1:
        return [await service.infer(calls[0], gone=lambda: until_disconnect(receive))]
    results: list[InferResult | None] = [None] * len(calls)
    gone = False

    async def one(i: int) -> None:
        results[i] = await service.infer(calls[i])

    try:
        async with anyio.create_task_group() as outer:

            async def watch() -> None:
                nonlocal gone
                await until_disconnect(receive)
                gone = True
                outer.cancel_scope.cancel()

            outer.start_soon(watch)
            async with anyio.create_task_group() as work:
                for i in range(len(calls)):
                    work.start_soon(one, i)
            outer.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    if gone:
        raise ClientGone("the client of this request went away")
    return [r for r in results if r is not None]


Emit = Callable[[bytes], Awaitable[None]]


class EventStream:
    """A `text/event-stream` response whose body `produce(emit)` writes; it is cancelled when the
    client goes away (its core streams, closed in its `finally`, leave the queue or stop)."""

    def __init__(self, produce: Callable[[Emit], Awaitable[None]]) -> None:
        self.produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await until_disconnect(receive)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await self.produce(emit)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            tg.cancel_scope.cancel()
