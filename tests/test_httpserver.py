"""The HTTP listener on both backends, in process: the connection cap answers the excess 503 and
closes it; a connection whose client closed its side is closed at once, not after the keep-alive
timeout (300 s here); the listening socket is close-on-exec."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from hypercorn.config import Config

from modelmora.httpserver import REFUSAL, HttpListener
from modelmora.server import bind_socket

pytestmark = pytest.mark.anyio

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def hello(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def listening(
    limit: int, *, keep_alive_s: float = 300, graceful_s: float = 1, app: Any = hello, stop: anyio.Event | None = None
) -> AsyncIterator[tuple[HttpListener, int]]:
    sock = bind_socket("127.0.0.1", 0)
    config = Config()
    config.keep_alive_timeout = keep_alive_s
    config.graceful_timeout = graceful_s
    listener = HttpListener(app, config, sock, limit=limit)
    stop = stop or anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, stop.wait)
            yield listener, sock.getsockname()[1]
            stop.set()
    finally:
        sock.close()


async def read_to_eof(stream: anyio.abc.SocketStream) -> bytes:
    data = b""
    with anyio.fail_after(30):  # a safety net: EOF comes at once, the keep-alive timeout is 300 s
        try:
            while True:
                data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data


async def read_answer(stream: anyio.abc.SocketStream) -> bytes:
    """One answer of `hello` (headers and body may arrive in separate reads)."""
    data = b""
    while not data.endswith(b"ok"):
        data += await stream.receive()
    return data


async def test_a_client_that_closed_its_side_is_closed_at_once() -> None:
    async with listening(limit=10) as (_, port), await anyio.connect_tcp("127.0.0.1", port) as client:
        await client.send(REQUEST)
        await client.send_eof()  # what a client closing after its request leaves the server with
        answer = await read_to_eof(client)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok")


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async with (
        listening(limit=10, keep_alive_s=0.2) as (_, port),
        await anyio.connect_tcp("127.0.0.1", port) as client,
    ):
        for _ in range(3):  # each request re-arms the one timer of the connection
            await client.send(REQUEST)
            assert (await read_answer(client)).startswith(b"HTTP/1.1 200 ")
        assert await read_to_eof(client) == b""  # idle: the server closes it


async def test_at_shutdown_idle_connections_close_at_once_and_busy_ones_after_their_answer() -> None:
    release = anyio.Event()
    started = anyio.Event()

    async def slow_then_hello(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            started.set()
            await release.wait()
        await hello(scope, receive, send)

    stop = anyio.Event()
    # keep-alive and graceful timeouts far beyond read_to_eof's safety net: only a prompt close passes
    async with (
        listening(limit=10, keep_alive_s=300, graceful_s=300, app=slow_then_hello, stop=stop) as (_, port),
        await anyio.connect_tcp("127.0.0.1", port) as idle,
        await anyio.connect_tcp("127.0.0.1", port) as busy,
    ):
        await idle.send(REQUEST)
        assert (await read_answer(idle)).startswith(b"HTTP/1.1 200 ")
        await busy.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await started.wait()
        stop.set()
        assert await read_to_eof(idle) == b""
        release.set()
        answer = await read_to_eof(busy)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok")


async def test_connections_over_the_cap_are_answered_503_and_closed() -> None:
    async with listening(limit=2) as (listener, port):
        kept = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(2)]
        for _ in range(3000):  # until the server has accepted both (a safety net of 30 s)
            if listener.accepted == 2:
                break
            await anyio.sleep(0.01)
        async with await anyio.connect_tcp("127.0.0.1", port) as extra:
            assert await read_to_eof(extra) == REFUSAL
        assert listener.statistics()["refused"] == 1
        for stream in kept:  # those within the cap are served
            await stream.send(REQUEST)
            assert (await stream.receive()).startswith(b"HTTP/1.1 200 ")
            await stream.aclose()


def test_the_listening_socket_is_not_inherited() -> None:
    sock = bind_socket("127.0.0.1", 0)
    with sock:
        assert not sock.get_inheritable()


LIMIT = 1000


async def limited(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    """Answers 413 at once (body unread) when the declared body is over LIMIT, else 200."""
    length = int(dict(scope["headers"]).get(b"content-length", b"0"))
    status = 413 if length > LIMIT else 200
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"no" if status == 413 else b"ok"})


async def test_http2_a_body_over_the_limit_is_413_on_its_stream_and_the_connection_goes_on() -> None:
    import httpx

    sock = bind_socket("127.0.0.1", 0)
    config = Config()
    config.graceful_timeout = 1
    listener = HttpListener(limited, config, sock, limit=10)
    stop = anyio.Event()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, stop.wait)
            async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as client:
                # within the flow-control window: the client sends it all, the server has answered before
                r = await client.post(url, content=b"x" * 40_000)
                assert r.http_version == "HTTP/2" and r.status_code == 413
                for _ in range(3):  # the same connection serves the next streams
                    r = await client.post(url, content=b"x" * 10)
                    assert r.status_code == 200 and r.text == "ok"
            assert listener.accepted == 1
            stop.set()
