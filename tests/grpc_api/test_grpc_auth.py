"""Token authentication on gRPC, in process (the gRPC listener over the echo app's core): every
method of ours refuses a call without a token (UNAUTHENTICATED), with an unknown one, or without the
scope (PERMISSION_DENIED); health and reflection stay open; admin calls are audited by name; rate
limits per token (RESOURCE_EXHAUSTED with retry-after), also per message of an InferStream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import structlog
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest

from modelmora._proto.modelmora import v1
from modelmora.api.grpc import GrpcListener
from modelmora.security import Gate
from modelmora.server import bind_socket

from conftest import AppUnderTest

pytestmark = pytest.mark.anyio

INFER_TOKEN = "grpc-infer-token-aaaaaaaa"
READ_TOKEN = "grpc-read-token-bbbbbbbbb"
ADMIN_TOKEN = "grpc-admin-token-cccccccc"
TOKENS = [f"app infer {INFER_TOKEN}", f"dash read {READ_TOKEN}", f"ops admin {ADMIN_TOKEN}"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """The gate's clock, driven by hand."""
    return Clock()


@pytest.fixture
async def grpc_channel(echo_app: AppUnderTest, clock: Clock) -> AsyncIterator[Channel]:
    sock = bind_socket("127.0.0.1", 0)
    gate = Gate(echo_app.settings.auth, clock=clock)
    listener = GrpcListener(echo_app.service, sock, "http://127.0.0.1/", gate=gate)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(listener.serve, stop.wait)
        channel = Channel("127.0.0.1", sock.getsockname()[1])
        try:
            yield channel
        finally:
            channel.close()
            stop.set()
    sock.close()


def md(token: str | None) -> dict[str, str] | None:
    return {"authorization": f"Bearer {token}"} if token else None


CALLS: list[tuple[str, str, Any]] = [
    (
        "infer",
        "infer",
        lambda c, m: v1.InferenceServiceStub(c).infer(v1.InferRequest(model_id="echo", texts=["a"]), metadata=m),
    ),
    ("read", "list_models", lambda c, m: v1.RegistryServiceStub(c).list_models(v1.ListModelsRequest(), metadata=m)),
    (
        "read",
        "get_model",
        lambda c, m: v1.RegistryServiceStub(c).get_model(v1.GetModelRequest(model_id="echo"), metadata=m),
    ),
    ("read", "get_status", lambda c, m: v1.ManagementServiceStub(c).get_status(v1.GetStatusRequest(), metadata=m)),
    (
        "admin",
        "update_model_settings",
        lambda c, m: v1.RegistryServiceStub(c).update_model_settings(
            v1.UpdateModelSettingsRequest(model_id="echo", settings=v1.ModelSettings(pinned=True)), metadata=m
        ),
    ),
    (
        "admin",
        "load_model",
        lambda c, m: v1.ManagementServiceStub(c).load_model(v1.LoadModelRequest(model_id="echo"), metadata=m),
    ),
    (
        "admin",
        "unload_model",
        lambda c, m: v1.ManagementServiceStub(c).unload_model(v1.UnloadModelRequest(model_id="echo"), metadata=m),
    ),
    (
        "admin",
        "delete_model",
        lambda c, m: v1.RegistryServiceStub(c).delete_model(v1.DeleteModelRequest(model_id="nope"), metadata=m),
    ),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.settings(auth={"tokens": TOKENS})
async def test_every_method_needs_its_scope(grpc_channel: Channel) -> None:
    tokens = {"infer": INFER_TOKEN, "read": READ_TOKEN, "admin": ADMIN_TOKEN}
    names = {"infer": "app", "read": "dash", "admin": "ops"}
    for scope, method, call in CALLS:
        with pytest.raises(GRPCError) as none:
            await call(grpc_channel, None)
        assert none.value.status == Status.UNAUTHENTICATED, method
        assert none.value.message == "this endpoint needs a token: send 'Authorization: Bearer <token>'"
        with pytest.raises(GRPCError) as wrong:
            await call(grpc_channel, md("not-a-known-token-000000"))
        assert (wrong.value.status, wrong.value.message) == (Status.UNAUTHENTICATED, "the token is not valid")
        for have, token in tokens.items():
            if have == scope:
                try:
                    await call(grpc_channel, md(token))
                except GRPCError as exc:  # past the gate: the method's own answer
                    assert (method, exc.status) == ("delete_model", Status.NOT_FOUND)
            else:
                with pytest.raises(GRPCError) as denied:
                    await call(grpc_channel, md(token))
                assert denied.value.status == Status.PERMISSION_DENIED, (method, have)
                assert denied.value.message == f"the token {names[have]!r} lacks the {scope!r} scope"


@pytest.mark.settings(auth={"tokens": TOKENS})
async def test_health_and_reflection_stay_open_and_errors_carry_the_code(grpc_channel: Channel) -> None:
    reply = await HealthStub(grpc_channel).Check(HealthCheckRequest(service=""))
    assert reply.status == HealthCheckResponse.SERVING
    async with ServerReflectionStub(grpc_channel).ServerReflectionInfo.open() as reflection:
        await reflection.send_message(ServerReflectionRequest(list_services=""), end=True)
        listed = await reflection.recv_message()
        assert listed is not None and listed.list_services_response.service
    async with grpc_channel.request(
        "/modelmora.v1.ManagementService/GetStatus", Cardinality.UNARY_UNARY, v1.GetStatusRequest, v1.ServerStatus
    ) as stream:
        await stream.send_message(v1.GetStatusRequest(), end=True)
        with pytest.raises(GRPCError):
            await stream.recv_message()
        assert stream.trailing_metadata is not None
        assert dict(stream.trailing_metadata)["modelmora-error-code"] == "unauthenticated"


@pytest.mark.settings(auth={"tokens": TOKENS})
async def test_admin_calls_are_audited_by_name(grpc_channel: Channel) -> None:
    stub = v1.ManagementServiceStub(grpc_channel)
    with structlog.testing.capture_logs() as logs:
        await stub.load_model(v1.LoadModelRequest(model_id="echo"), metadata=md(ADMIN_TOKEN))
        await stub.unload_model(v1.UnloadModelRequest(model_id="echo"), metadata=md(ADMIN_TOKEN))
    audit = [(e["action"], e["by"], e["outcome"]) for e in logs if e["event"] == "audit"]
    assert audit == [("load", "ops", "ok"), ("unload", "ops", "ok")]
    assert ADMIN_TOKEN not in repr(logs)


@pytest.mark.settings(auth={"tokens": TOKENS, "rate_limit_per_s": 1.0, "rate_limit_burst": 3})
async def test_a_token_over_its_rate_is_refused_per_call_and_per_stream_message(
    grpc_channel: Channel, clock: Clock
) -> None:
    stub = v1.InferenceServiceStub(grpc_channel)
    await stub.infer(v1.InferRequest(model_id="echo", texts=["a"]), metadata=md(INFER_TOKEN))
    async with stub.channel.request(
        "/modelmora.v1.InferenceService/InferStream",
        Cardinality.STREAM_STREAM,
        v1.InferRequest,
        v1.InferStreamResponse,
        metadata=md(INFER_TOKEN),
    ) as stream:
        for i in range(4):  # the call's admission counts the first; the bucket holds 2 after the unary call
            await stream.send_message(v1.InferRequest(request_id=str(i), model_id="echo", texts=["a"]))
        await stream.end()
        answers = {}
        async for answer in stream:
            answers[answer.request_id] = answer
    assert {r for r, a in answers.items() if a.response is not None} == {"0", "1"}
    refused = [answers[r].error for r in ("2", "3")]
    assert all(e is not None and (e.status, e.code) == (8, "rate_limited") for e in refused)
    with pytest.raises(GRPCError) as err:
        await stub.infer(v1.InferRequest(model_id="echo", texts=["a"]), metadata=md(INFER_TOKEN))
    assert err.value.status == Status.RESOURCE_EXHAUSTED
    await v1.ManagementServiceStub(grpc_channel).get_status(v1.GetStatusRequest(), metadata=md(READ_TOKEN))
    clock.now += 1.0
    await stub.infer(v1.InferRequest(model_id="echo", texts=["a"]), metadata=md(INFER_TOKEN))


@pytest.fixture
async def grpc_port(echo_app: AppUnderTest, clock: Clock) -> AsyncIterator[int]:
    """The gRPC listener with tokens, for the SDK."""
    sock = bind_socket("127.0.0.1", 0)
    listener = GrpcListener(echo_app.service, sock, "http://127.0.0.1/", gate=Gate(echo_app.settings.auth, clock=clock))
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(listener.serve, stop.wait)
        try:
            yield sock.getsockname()[1]
        finally:
            stop.set()
    sock.close()


@pytest.mark.settings(auth={"tokens": TOKENS})
async def test_the_sdk_sends_its_token_from_the_argument_or_the_environment(
    grpc_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelmora.client import AsyncClient, PermissionDeniedError, RetryPolicy, UnauthenticatedError

    target, once = f"127.0.0.1:{grpc_port}", RetryPolicy(max_attempts=1)
    monkeypatch.delenv("MODELMORA_TOKEN", raising=False)
    async with AsyncClient(target, retry=once) as anonymous:
        with pytest.raises(UnauthenticatedError):
            await anonymous.models()
    async with AsyncClient(target, retry=once, token=READ_TOKEN) as reader:
        assert [m.id for m in await reader.models()] == ["echo"]
        assert READ_TOKEN not in repr(reader) and READ_TOKEN not in str(reader.metadata)
        with pytest.raises(PermissionDeniedError):
            await reader.embed("echo", ["a"])
    monkeypatch.setenv("MODELMORA_TOKEN", INFER_TOKEN)
    async with AsyncClient(target, retry=once) as app:
        assert (await app.embed("echo", ["abc"])).shape == (1, 4)
