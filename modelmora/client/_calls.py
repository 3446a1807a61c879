# ruff: noqa: ASYNC109  (`timeout` is the call's gRPC deadline, the name grpclib and grpcio use)
"""The call machinery the client's method groups share: one attempt's stream, grpclib's leftover
cancel requests, and what the methods of another module need of `AsyncClient` (`ClientCalls`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from grpclib.client import Channel, Stream
from grpclib.metadata import Deadline

__all__ = ("Attempt", "ClientCalls", "cancel_requests", "optional", "split_target", "take_back")

T = TypeVar("T")


class Attempt:
    """Stands in for the channel in a generated stub during one attempt, keeping the stream it opens:
    its trailing metadata (the server's error code and field) and whether the request left."""

    __slots__ = ("channel", "stream")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.stream: Stream[Any, Any] | None = None

    def request(self, *args: Any, **kwargs: Any) -> Stream[Any, Any]:
        self.stream = self.channel.request(*args, **kwargs)
        return self.stream

    @property
    def sent(self) -> bool:
        """Whether the request's headers were written (grpclib sets `peer` once they are)."""
        return self.stream is not None and self.stream.peer is not None

    @property
    def trailers(self) -> Mapping[str, str | bytes] | None:
        return self.stream.trailing_metadata if self.stream is not None else None


def cancel_requests() -> tuple[asyncio.Task[Any] | None, int]:
    """The current task and its pending cancel requests now (for `take_back`)."""
    task = asyncio.current_task()
    return task, task.cancelling() if task is not None else 0


def take_back(task: asyncio.Task[Any] | None, cancels: int) -> None:
    """grpclib ends a call on a lost connection or a passed deadline by cancelling the task that
    waits on it and raising its own error instead of CancelledError, leaving the task's cancel
    request behind: anyio's cancel scopes and asyncio's task groups would later take it for a
    cancellation from outside. Take back the requests made during the failed step."""
    if task is not None:
        while task.cancelling() > cancels:
            task.uncancel()


def split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"target must be host:port (got {target!r})")
    return host.strip("[]"), int(port)


def optional(**values: Any) -> dict[str, Any]:
    """The keyword arguments that were given (None: the server's default)."""
    return {k: v for k, v in values.items() if v is not None}


class ClientCalls:
    """What `AsyncClient` provides to the method groups it is made of (`ManageMethods`,
    `StreamMethods`): its channel, call options and retried unary calls."""

    if TYPE_CHECKING:

        async def _unary(
            self,
            name: str,
            call: Callable[[Channel, Deadline | None, dict[str, str] | None], Awaitable[T]],
            *,
            idempotent: bool,
            timeout: float | None,
            metadata: Mapping[str, str] | None,
        ) -> T: ...

        def _options(
            self, timeout: float | None, metadata: Mapping[str, str] | None
        ) -> tuple[Deadline | None, dict[str, str] | None]: ...

        def _get_channel(self) -> Channel: ...
