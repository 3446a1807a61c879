"""The Open Inference Protocol's gRPC repository calls (RepositoryModelLoad, RepositoryModelUnload)
pass the gate like our own admin calls and are audited with the caller's token name, never the
token (in process: the gRPC listener over the echo app's core; asyncio only)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import structlog
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from modelmora._proto import inference as pb
from modelmora.api.grpc import GrpcListener
from modelmora.security import Gate
from modelmora.server import bind_socket

from conftest import AppUnderTest

pytestmark = pytest.mark.anyio

READ_TOKEN = "oip-read-token-bbbbbbbbbb"
ADMIN_TOKEN = "oip-admin-token-cccccccccc"
AUTH = pytest.mark.settings(auth={"tokens": [f"dash read {READ_TOKEN}", f"ops admin {ADMIN_TOKEN}"]})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # grpclib


@pytest.fixture
async def stub(echo_app: AppUnderTest) -> AsyncIterator[pb.GrpcInferenceServiceStub]:
    sock = bind_socket("127.0.0.1", 0)
    listener = GrpcListener(echo_app.service, sock, "http://127.0.0.1/", gate=Gate(echo_app.settings.auth))
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(listener.serve, stop.wait)
        channel = Channel("127.0.0.1", sock.getsockname()[1])
        try:
            yield pb.GrpcInferenceServiceStub(channel)
        finally:
            channel.close()
            stop.set()
    sock.close()


def md(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@AUTH
async def test_repository_load_and_unload_are_audited_by_the_tokens_name(stub: pb.GrpcInferenceServiceStub) -> None:
    with structlog.testing.capture_logs() as logs:
        await stub.repository_model_load(pb.RepositoryModelLoadRequest(model_name="echo"), metadata=md(ADMIN_TOKEN))
        await stub.repository_model_unload(pb.RepositoryModelUnloadRequest(model_name="echo"), metadata=md(ADMIN_TOKEN))
        with pytest.raises(GRPCError) as err:
            await stub.repository_model_load(pb.RepositoryModelLoadRequest(model_name="nope"), metadata=md(ADMIN_TOKEN))
        assert err.value.status == Status.NOT_FOUND
        with pytest.raises(GRPCError) as err:
            await stub.repository_model_load(pb.RepositoryModelLoadRequest(model_name="echo"), metadata=md(READ_TOKEN))
        assert err.value.status == Status.PERMISSION_DENIED
    audit = [(e["action"], e["by"], e["model"], e["outcome"]) for e in logs if e["event"] == "audit"]
    assert audit == [
        ("load", "ops", "echo", "ok"),
        ("unload", "ops", "echo", "ok"),
        ("load", "ops", "nope", "model_not_found"),
    ]
    assert ADMIN_TOKEN not in repr(logs) and READ_TOKEN not in repr(logs)
