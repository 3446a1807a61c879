"""The gate on every gRPC method: the listener wraps each handler so that the caller's `authorization`
metadata (`Bearer <token>`) is checked against the method's access (`api.access.GRPC_ACCESS`) before
the handler runs, so before any message is decoded. A refused call ends with UNAUTHENTICATED,
PERMISSION_DENIED or RESOURCE_EXHAUSTED and our error metadata. The admitted call's permit (its
identity) is the handler's through `current_permit()`, which `Calls.guard` puts in its context."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

from grpclib.const import Handler
from grpclib.server import Stream

from ...errors import ModelMoraError
from ...security import OPEN, Gate, Permit
from ..access import grpc_access
from .errors import send_error

__all__ = ("current_permit", "guarded")

_PERMIT: ContextVar[Permit | None] = ContextVar("modelmora_grpc_permit", default=None)


def current_permit() -> Permit | None:
    """The permit of the call this task serves (None: no gate, authentication off)."""
    return _PERMIT.get()


def guarded(handlers: Mapping[str, Handler], gate: Gate) -> dict[str, Handler]:
    """`handlers` (method path -> handler) with the gate in front of each one that needs it.

    Raises:
        KeyError: a method is not in the access table (it would be served unguarded).
    """
    out: dict[str, Handler] = {}
    for path, handler in handlers.items():
        access = grpc_access(path)
        if access == OPEN or not gate.enabled:
            out[path] = handler
        else:
            out[path] = handler._replace(func=functools.partial(_gated, gate, access, handler.func))
    return out


async def _gated(
    gate: Gate, access: Any, func: Callable[[Stream[Any, Any]], Awaitable[None]], stream: Stream[Any, Any]
) -> None:
    authorization = stream.metadata.get("authorization") if stream.metadata is not None else None
    try:
        permit = gate.admit(access, authorization if isinstance(authorization, str) else None)
    except ModelMoraError as exc:
        await send_error(stream, exc)
        return
    reset = _PERMIT.set(permit)
    try:
        await func(stream)
    finally:
        _PERMIT.reset(reset)
        permit.release()
