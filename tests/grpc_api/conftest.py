"""gRPC tests run on asyncio (grpclib is asyncio only), against `mm serve` subprocesses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import pytest
from grpclib.client import Channel

from modelmora._proto.modelmora import v1

from serverproc import ServerProcess

T = TypeVar("T")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def channel(server: ServerProcess) -> AsyncIterator[Channel]:
    """A grpclib channel to the module's server (each test module defines `server`)."""
    ch = Channel("127.0.0.1", server.grpc_port)
    try:
        yield ch
    finally:
        ch.close()


async def eventually(check: Callable[[], Awaitable[T]], accept: Callable[[T], bool], timeout_s: float = 30) -> T:
    """Poll `check()` until `accept` says yes (a safety net bound, not a performance assert)."""
    with anyio.fail_after(timeout_s):
        while True:
            value = await check()
            if accept(value):
                return value
            await anyio.sleep(0.02)


async def model_status(channel: Channel, model_id: str) -> v1.ModelStatus:
    status = await v1.ManagementServiceStub(channel).get_status(v1.GetStatusRequest())
    return next(m for m in status.models if m.model_id == model_id)


def settled(m: Any) -> bool:
    """Nothing queued, nothing running, nothing left in the worker's request ring."""
    worker = m.worker
    return (
        m.queue_depth == 0
        and not m.busy
        and (worker is None or (worker.in_flight_batches == 0 and worker.request_ring_used_bytes == 0))
    )
