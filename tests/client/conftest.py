"""One `mm serve` for the whole package (MiniLM and the tiny models), and TCP peers of the tests'
own for the retry tests: one that forwards to the server, one that drops each connection once the
request has arrived. grpclib is asyncio only: these tests run on asyncio."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import h2.config
import h2.connection
import h2.events
import pytest
from anyio.abc import SocketStream

from serverproc import ServerProcess, mm
from tiny_models import build_blip, build_clip, build_gpt2, build_sd

MINILM = "minilm"
SPARE = "spare"
"""A second MiniLM, which the registry tests change and delete."""
BUILDERS = {"gpt2": build_gpt2, "blip": build_blip, "clip": build_clip, "sd": build_sd}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Iterator[ServerProcess]:
    src = tmp_path_factory.mktemp("client-models")
    home = tmp_path_factory.mktemp("client-home")
    mm("install", str(minilm_path), "--id", MINILM, "--task", "txt2embed", home=home)
    mm("install", str(minilm_path), "--id", SPARE, "--task", "txt2embed", home=home)  # to delete
    for name, build in BUILDERS.items():
        mm("install", str(build(src / name)), "--id", name, home=home)
    srv = ServerProcess(home, {"MODELMORA_TORCH_THREADS": "1"}).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0


@pytest.fixture
def target(server: ServerProcess) -> str:
    """The server's gRPC address, as the client takes it."""
    return f"127.0.0.1:{server.grpc_port}"


@dataclass
class Peer:
    port: int
    connections: int = 0
    requests: list[dict[str, str]] = field(default_factory=list)
    """The dropping peer: each request's headers (HTTP/2 pseudo-headers and metadata)."""


async def _read_request(client: SocketStream, peer: Peer) -> None:
    """Read until a request's headers have arrived (decoded with h2, as a server would)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    async for chunk in client:
        for event in conn.receive_data(chunk):
            if isinstance(event, h2.events.RequestReceived):
                peer.requests.append({str(k): str(v) for k, v in event.headers or ()})
                return


async def _pipe(source: SocketStream, sink: SocketStream, done: anyio.CancelScope) -> None:
    try:
        async for chunk in source:
            await sink.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    finally:
        done.cancel()


@asynccontextmanager
async def _peer(port: int, upstream: int | None, *, hold: bool = False) -> AsyncIterator[Peer]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    peer = Peer(int(listener.extra(anyio.abc.SocketAttribute.local_port)))

    async def handle(client: SocketStream) -> None:
        peer.connections += 1
        async with client:
            if upstream is None:
                await _read_request(client, peer)
                if hold:  # never answer
                    await anyio.sleep_forever()
                return  # the connection drops once the request has arrived
            async with await anyio.connect_tcp("127.0.0.1", upstream) as up, anyio.create_task_group() as tg:
                tg.start_soon(_pipe, client, up, tg.cancel_scope)
                tg.start_soon(_pipe, up, client, tg.cancel_scope)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield peer
        tg.cancel_scope.cancel()


@pytest.fixture
def tcp_peer() -> Callable[..., AbstractAsyncContextManager[Peer]]:
    """`tcp_peer(port, upstream, hold=False)`: listen on `port` (0: any free one) and forward each
    connection to the port `upstream`; with `upstream` None, read each request and drop its
    connection unanswered (`hold`: keep it open, never answering).
    (A context manager to enter in the test: its task group lives in the test's task.)"""
    return _peer
