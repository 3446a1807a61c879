"""The Open Inference Protocol's gRPC service behind the gate (in process: the gRPC listener over the
echo app's core; asyncio only): its repository calls (RepositoryModelLoad, RepositoryModelUnload) are
audited with the caller's token name, never the token, and each message of a ModelStreamInfer counts
against the token's rate limit."""

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
from modelmora.api.oip.tensors import pack_bytes
from modelmora.security import Gate
from modelmora.server import bind_socket

from conftest import AppUnderTest

pytestmark = pytest.mark.anyio

INFER_TOKEN = "oip-infer-token-aaaaaaaaa"
READ_TOKEN = "oip-read-token-bbbbbbbbbb"
ADMIN_TOKEN = "oip-admin-token-cccccccccc"
TOKENS = [f"app infer {INFER_TOKEN}", f"dash read {READ_TOKEN}", f"ops admin {ADMIN_TOKEN}"]
AUTH = pytest.mark.settings(auth={"tokens": TOKENS})


class Clock:
    """The gate's clock, driven by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # grpclib


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def stub(echo_app: AppUnderTest, clock: Clock) -> AsyncIterator[pb.GrpcInferenceServiceStub]:
    sock = bind_socket("127.0.0.1", 0)
    gate = Gate(echo_app.settings.auth, clock=clock)
    listener = GrpcListener(echo_app.service, sock, "http://127.0.0.1/", gate=gate)
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


def text_request(request_id: str) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequestInferInputTensor(name="text", datatype="BYTES", shape=[1])
    return pb.ModelInferRequest(
        model_name="echo", id=request_id, inputs=[tensor], raw_input_contents=[pack_bytes([b"a"])]
    )


@pytest.mark.settings(auth={"tokens": TOKENS, "rate_limit_per_s": 1.0, "rate_limit_burst": 1})
async def test_each_message_of_a_stream_counts_against_the_tokens_rate(
    stub: pb.GrpcInferenceServiceStub, clock: Clock
) -> None:
    answered: dict[str, pb.ModelStreamInferResponse] = {}
    two_answered, done = anyio.Event(), anyio.Event()

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        yield text_request("0")  # admitted with the call: the burst of one is spent
        yield text_request("1")  # over the rate
        await two_answered.wait()
        clock.now += 1.0  # one request's worth comes back
        yield text_request("2")
        await done.wait()

    async for response in stub.model_stream_infer(requests(), metadata=md(INFER_TOKEN)):
        answered[response.infer_response.id] = response
        if len(answered) == 2:
            two_answered.set()
        if len(answered) == 3:
            done.set()
    assert not answered["0"].error_message and answered["0"].infer_response.model_name == "echo"
    assert answered["1"].error_message == "this token is over its rate limit of 1 requests/s; retry in 1.00 s"
    assert not answered["2"].error_message and answered["2"].infer_response.model_name == "echo"
