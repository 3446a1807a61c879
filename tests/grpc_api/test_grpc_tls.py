"""gRPC over TLS, in process (the gRPC listener over the echo app's core, certificates by trustme): a
grpclib channel that trusts the CA, one that does not, mutual TLS with and without a client
certificate, and rotation: new connections get the new certificate, an open channel goes on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from grpclib.client import Channel
from grpclib.exceptions import StreamTerminatedError

from modelmora._proto.modelmora import v1
from modelmora.api.grpc import GrpcListener
from modelmora.config import load_settings
from modelmora.security import ServerTls
from modelmora.server import bind_socket

from conftest import AppUnderTest
from tlsfiles import TlsFiles, peer_common_name

pytestmark = pytest.mark.anyio

REQUEST = v1.InferRequest(model_id="echo", texts=["hello"])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def files(tmp_path: Path) -> TlsFiles:
    return TlsFiles(tmp_path / "tls")


@asynccontextmanager
async def grpc_tls(app: AppUnderTest, tls: ServerTls) -> AsyncIterator[int]:
    sock = bind_socket("127.0.0.1", 0)
    listener = GrpcListener(app.service, sock, "https://127.0.0.1/", ssl=tls.grpc)
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(listener.serve, stop.wait)
            yield sock.getsockname()[1]
            stop.set()
    finally:
        sock.close()


def server_tls(files: TlsFiles, *, mutual: bool = False) -> ServerTls:
    return ServerTls(load_settings(None, environ={}, tls=files.settings(mutual=mutual)).tls)


async def infer(port: int, ctx: object) -> v1.InferResponse:
    channel = Channel("127.0.0.1", port, ssl=ctx)  # type: ignore[arg-type]
    try:
        with anyio.fail_after(60):  # a safety net
            return await v1.InferenceServiceStub(channel).infer(REQUEST)
    finally:
        channel.close()


async def test_grpc_over_tls_with_a_trusted_ca_and_refused_without(echo_app: AppUnderTest, files: TlsFiles) -> None:
    async with grpc_tls(echo_app, server_tls(files)) as port:
        reply = await infer(port, files.client_context(alpn=("h2",)))
        assert tuple(reply.embeddings.shape) == (1, 4)
        name, alpn = await anyio.to_thread.run_sync(peer_common_name, port, files.client_context(alpn=("h2",)))
        assert (name, alpn) == (files.cert_name, "h2")
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
            await infer(port, files.client_context(alpn=("h2",), trust=False))


async def test_grpc_mutual_tls(echo_app: AppUnderTest, files: TlsFiles) -> None:
    async with grpc_tls(echo_app, server_tls(files, mutual=True)) as port:
        reply = await infer(port, files.client_context(alpn=("h2",), client_cert=True))
        assert tuple(reply.embeddings.shape) == (1, 4)
        with pytest.raises((OSError, StreamTerminatedError)):  # TLS 1.3: the alert follows the handshake
            await infer(port, files.client_context(alpn=("h2",)))


async def test_grpc_rotation_serves_new_connections_with_the_new_certificate(
    echo_app: AppUnderTest, files: TlsFiles
) -> None:
    tls = server_tls(files)
    async with grpc_tls(echo_app, tls) as port:
        kept = Channel("127.0.0.1", port, ssl=files.client_context(alpn=("h2",)))
        try:
            stub = v1.InferenceServiceStub(kept)
            await stub.infer(REQUEST)
            second = files.rotate()
            assert tls.reload()
            name, _ = await anyio.to_thread.run_sync(peer_common_name, port, files.client_context(alpn=("h2",)))
            assert name == second
            assert tuple((await stub.infer(REQUEST)).embeddings.shape) == (1, 4)  # the open channel goes on
            assert tuple((await infer(port, files.client_context(alpn=("h2",)))).embeddings.shape) == (1, 4)
        finally:
            kept.close()


async def test_the_sdk_verifies_the_server_with_its_ca_file_and_shows_its_client_certificate(
    echo_app: AppUnderTest, files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelmora.client import AsyncClient, RetryPolicy, UnavailableError

    for name in ("MODELMORA_CA_FILE", "MODELMORA_CLIENT_CERT", "MODELMORA_CLIENT_KEY"):
        monkeypatch.delenv(name, raising=False)
    cert, key = files.client_cert()
    once = RetryPolicy(max_attempts=1)
    async with grpc_tls(echo_app, server_tls(files, mutual=True)) as port:
        target = f"127.0.0.1:{port}"
        async with AsyncClient(
            target, retry=once, ca_file=str(files.ca_file), cert_file=str(cert), key_file=str(key)
        ) as mm:
            assert (await mm.embed("echo", ["abc"])).shape == (1, 4)
        monkeypatch.setenv("MODELMORA_CA_FILE", str(files.ca_file))  # the environment, no client certificate
        async with AsyncClient(target, retry=once) as mm:
            with pytest.raises(UnavailableError):
                await mm.embed("echo", ["abc"])
