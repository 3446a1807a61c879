"""The HTTP listener's drain, in process on both backends: once `shutdown` returns, a request
already running is answered in full and its connection closed; a connection accepted meanwhile
gets `draining_app` (readiness 503, liveness 200, anything else 503 `shutting_down`) until
`closing` returns; when `forced` returns, what still runs is cancelled."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from hypercorn.config import Config

from modelmora.httpserver import HttpListener
from modelmora.server import bind_socket

pytestmark = pytest.mark.anyio


class Held:
    """An app whose `/held` requests wait for `release`; everything else is answered at once."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.started = 0
        self.running = anyio.Event()

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        assert scope["type"] == "http"
        if scope["path"] == "/held":
            self.started += 1
            self.running.set()
            await self.release.wait()
        body = b"served:" + scope["path"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


async def _raw(port: int, request: bytes) -> bytes:
    """Send `request` on a new connection and read until the server closes it."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        data = b""
        with anyio.fail_after(30):  # a safety net: the server closes after its answer
            try:
                while True:
                    data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return data


async def _until_draining(listener: HttpListener) -> None:
    with anyio.fail_after(30):  # a safety net: the drain begins as soon as `shutdown` returns
        while True:
            if listener.draining:
                return
            await anyio.sleep(0.01)


async def test_a_running_request_finishes_while_new_connections_are_refused() -> None:
    app = Held()
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = Config()
    config.graceful_timeout = 3600  # only the drain ends the wait
    listener = HttpListener(app, config, sock, limit=100)
    shutdown, closing = anyio.Event(), anyio.Event()
    held: list[bytes] = []
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: listener.serve(shutdown.wait, closing=closing.wait))

            answered = anyio.Event()

            async def hold() -> None:
                held.append(await _raw(port, b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n"))
                answered.set()

            tg.start_soon(hold)
            await app.running.wait()
            shutdown.set()
            await _until_draining(listener)

            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                ready = await client.get("/health/ready")
                assert ready.status_code == 503
                assert ready.json() == {"status": "unavailable", "reason": "the server is shutting down"}
                assert (await client.get("/v2/health/ready")).status_code == 503
                live = await client.get("/health/live")
                assert live.status_code == 200 and live.json() == {"status": "ok"}
                refused = await client.post("/api/v1/infer/m", content=b"x" * 200_000)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "shutting_down"
                assert refused.headers["connection"] == "close"
            assert app.started == 1 and held == []  # the new connections reached only the drain answers

            app.release.set()
            await listener.wait_served()  # the connection open before the drain has ended
            await answered.wait()
            assert held[0].startswith(b"HTTP/1.1 200 ") and held[0].endswith(b"served:/held")
            assert (await _raw(port, b"GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 503 ")
            closing.set()  # now accepting stops and `serve` returns
    assert listener.open == 0


async def test_without_closing_accepting_stops_once_the_running_requests_are_answered() -> None:
    app = Held()
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = Config()
    config.graceful_timeout = 3600
    listener = HttpListener(app, config, sock, limit=100)
    shutdown = anyio.Event()
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, shutdown.wait)
            answers: list[httpx.Response] = []
            client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
            async with client, anyio.create_task_group() as requests:

                async def held() -> None:
                    answers.append(await client.get("/held"))

                requests.start_soon(held)
                await app.running.wait()
                shutdown.set()
                app.release.set()
            assert answers[0].status_code == 200 and answers[0].text == "served:/held"
    assert listener.open == 0


async def test_forced_cancels_what_still_runs() -> None:
    app = Held()
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = Config()
    config.graceful_timeout = 3600
    listener = HttpListener(app, config, sock, limit=100)
    shutdown, forced = anyio.Event(), anyio.Event()
    held: list[bytes] = []
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: listener.serve(shutdown.wait, forced=forced.wait))

            async def hold() -> None:
                held.append(await _raw(port, b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n"))

            tg.start_soon(hold)
            await app.running.wait()
            shutdown.set()
            forced.set()  # `serve` returns with the request still held
    assert not app.release.is_set() and listener.open == 0
    assert held == [] or not held[0].startswith(b"HTTP/1.1 200 ")
