"""The HTTP listener: our own accept loop in front of Hypercorn's per-connection protocol code
(HTTP/1.1 and HTTP/2 cleartext, or HTTPS with HTTP/2 or HTTP/1.1 chosen by ALPN), on asyncio or trio.

Hypercorn's `serve` is not used because, under connection churn, it let the process run out of
file descriptors: it has no connection cap, a connection whose client had closed its side
(as curl does after each response) stayed open in CLOSE-WAIT until the keep-alive timeout, and it
marks the listening socket inheritable (so the zygote and every worker held the HTTP port). Here:

- at most `limit` connections are served at once; one beyond it is accepted, answered
  `503 too_many_connections` (with `Retry-After: 1` and `Connection: close`) and closed at once,
  so the excess costs a descriptor for an instant, never for the life of a connection;
- a connection is closed as soon as its client has closed its side and no request of it is
  running (an idle keep-alive connection after `keep_alive_timeout`);
- an accept that fails for lack of descriptors or memory is logged (once per burst), and the
  loop waits a little and goes on, like trio's `serve_listeners`;
- the listening socket stays close-on-exec;
- with an `ssl` context each accepted socket is wrapped server-side (asyncio: the loop's
  `connect_accepted_socket`, as `start_server` would; trio: an `SSLStream`, whose handshake Hypercorn's
  connection runs), within `config.ssl_handshake_timeout`; the context is read at each accept;
- on HTTP/2, request body data that arrives for a stream already answered (413 before the whole
  body was read) is acknowledged and the stream reset with NO_ERROR (RFC 9113 section 8.1), where
  Hypercorn raised KeyError and dropped the connection with every other stream on it;
- draining (`serve`'s `shutdown` returned): the open connections finish their running requests and
  close (idle ones at once); connections accepted meanwhile are answered by
  `shutdown.draining_app` (503 `shutting_down`, `/health/ready` 503, `/health/live` 200), so that
  probes and late clients get an answer rather than a refused connection, until `closing`
  returns; what is left when `forced` returns is cancelled.
"""

from __future__ import annotations

import errno
import functools
import math
import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from ssl import SSLContext
from typing import Any

import anyio
import anyio.abc
import h2.errors
import h2.events
import h2.exceptions
import msgspec
import structlog
from hypercorn.config import Config
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.typing import AppWrapper
from hypercorn.utils import wrap_app

from .shutdown import draining_app

__all__ = ("REFUSAL", "HttpListener", "current_backend")

log = structlog.get_logger("modelmora.http")

_REFUSAL_BODY = msgspec.json.encode(
    {"error": {"code": "too_many_connections", "message": "the server has too many open connections; retry"}}
)
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY
)
"""What a connection beyond the cap receives before it is closed."""

_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_TRANSIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN, errno.EINTR})
_ACCEPT_PAUSE_S = 0.1


def _refuse(conn: socket.socket) -> None:
    """Answer 503 without waiting and close. What the client already sent is read first, so that
    the close sends FIN rather than a reset that could discard the answer."""
    try:
        conn.setblocking(False)
        with suppress(OSError):
            conn.send(REFUSAL)
            while conn.recv(65536):
                pass
        with suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
    finally:
        conn.close()


class HttpListener:
    """Serves `app` on the listening socket `sock` with at most `limit` open connections, over TLS
    when `ssl` is given (a server context; its ALPN protocols choose HTTP/2 or HTTP/1.1)."""

    def __init__(
        self, app: Any, config: Config, sock: socket.socket, *, limit: int, ssl: SSLContext | None = None
    ) -> None:
        self.app: AppWrapper = wrap_app(app, config.wsgi_max_body_size, "asgi")
        self.draining_app: AppWrapper = wrap_app(draining_app, config.wsgi_max_body_size, "asgi")
        self.config = config
        self.sock = sock
        self.limit = limit
        self.ssl = ssl
        self.open = 0
        self.accepted = 0
        self.refused = 0
        self.accept_errors = 0
        self.draining = False
        self.serving = 0
        """Open connections accepted before the drain began (those that run requests of `app`)."""
        self._context: Any = None
        self._drain_context: Any = None
        self._served = anyio.Event()
        self._drained = anyio.Event()

    def statistics(self) -> dict[str, int]:
        """Open connections, the cap, and totals since start."""
        return {
            "open": self.open,
            "limit": self.limit,
            "accepted": self.accepted,
            "refused": self.refused,
            "accept_errors": self.accept_errors,
        }

    async def wait_served(self) -> None:
        """Return once the drain has begun and every connection accepted before it has ended."""
        await self._served.wait()

    async def serve(
        self,
        shutdown: Callable[[], Awaitable[object]],
        *,
        closing: Callable[[], Awaitable[object]] | None = None,
        forced: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Accept until `shutdown` returns; then drain: idle connections close, running ones close
        once their requests are answered, and connections accepted from then on get `draining_app`.
        Accepting stops when `closing` returns (default: `wait_served`); the connections left are
        cancelled when `forced` returns (default: `config.graceful_timeout` seconds after `shutdown`).
        """
        self._context = _worker_context()
        self.sock.setblocking(False)
        async with anyio.create_task_group() as connections:
            async with anyio.create_task_group() as front:
                front.start_soon(self._accept_forever, connections)
                await shutdown()
                stop_at_once = forced or functools.partial(
                    anyio.sleep_until, anyio.current_time() + self.config.graceful_timeout
                )
                self._drain_context = _worker_context()  # not terminated: its requests get read
                await self._context.terminated.set()
                self.draining = True
                if not self.serving:
                    self._served.set()
                await _first(closing or self.wait_served, stop_at_once)
                front.cancel_scope.cancel()
            await self._drain_context.terminated.set()
            if not self.open:
                self._drained.set()
            await _first(self._drained.wait, stop_at_once)
            connections.cancel_scope.cancel()

    async def _accept_forever(self, connections: anyio.abc.TaskGroup) -> None:
        failing = False
        while True:
            await anyio.wait_readable(self.sock)
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in _TRANSIENT_ERRNOS:
                    continue
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                self.accept_errors += 1
                if not failing:  # once per burst, not once per attempt
                    log.warning("accept_failed", error=errno.errorcode.get(exc.errno or 0, str(exc)), open=self.open)
                failing = True
                await anyio.sleep(_ACCEPT_PAUSE_S)
                continue
            failing = False
            if self.open >= self.limit:
                self.refused += 1
                _refuse(conn)
                continue
            self.accepted += 1
            self.open += 1
            serving = not self.draining
            if serving:
                self.serving += 1
            connections.start_soon(self._connection, conn, serving)

    async def _connection(self, conn: socket.socket, serving: bool) -> None:
        app, context = (self.app, self._context) if serving else (self.draining_app, self._drain_context)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if _asyncio_running():
                await _serve_asyncio(app, self.config, context, conn, self.ssl)
            else:
                await _serve_trio(app, self.config, context, conn, self.ssl)
        except OSError:
            conn.close()
        finally:
            self.open -= 1
            if serving:
                self.serving -= 1
            if self.draining and not self.serving:
                self._served.set()
            if not self.open and self._drain_context is not None and self._drain_context.terminated.is_set():
                self._drained.set()


async def _first(main: Callable[[], Awaitable[object]], stopper: Callable[[], Awaitable[object]]) -> None:
    """Wait until `main` or `stopper` returns, whichever first."""
    async with anyio.create_task_group() as tg:

        async def run(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            tg.cancel_scope.cancel()

        tg.start_soon(run, main)
        tg.start_soon(run, stopper)


def _asyncio_running() -> bool:
    """True inside a running asyncio loop (else we run on trio)."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def current_backend() -> str:
    """ "asyncio" or "trio": the backend running the calling task."""
    return "asyncio" if _asyncio_running() else "trio"


def _worker_context() -> Any:
    if _asyncio_running():
        from hypercorn.asyncio.worker_context import WorkerContext as AsyncioContext

        return AsyncioContext(None)
    from hypercorn.trio.worker_context import WorkerContext as TrioContext

    return TrioContext(None)


class _H2Protocol(H2Protocol):
    """Hypercorn's HTTP/2 protocol, with body data for a stream whose response has been sent (and
    which Hypercorn has forgotten) acknowledged and the stream reset, not a KeyError."""

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        if not any(isinstance(e, h2.events.DataReceived) and e.stream_id not in self.streams for e in events):
            await super()._handle_events(events)  # the common case, in one go
            return
        for event in events:  # in order: a stream may start in this same batch
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self._discard(event)
            else:
                await super()._handle_events([event])
        await self._flush()

    def _discard(self, event: h2.events.DataReceived) -> None:
        self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if event.stream_ended is None and event.stream_id not in self.stream_buffers:
            # the response is out (its buffer goes once END_STREAM is sent): stop the upload
            with suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.NO_ERROR)


class _Protocol:
    """Hypercorn's `ProtocolWrapper` (HTTP/1.1, upgraded to HTTP/2 on request), whose HTTP/2
    protocol, once made, is `_h2_protocol()`."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    async def initiate(self) -> None:
        if type(self.wrapped.protocol) is H2Protocol:  # HTTP/2 chosen by ALPN: ours from the start
            self.wrapped.protocol.__class__ = _H2Protocol
        await self.wrapped.initiate()

    async def handle(self, event: Any) -> None:
        await self.wrapped.handle(event)
        protocol = self.wrapped.protocol
        if type(protocol) is H2Protocol:  # just upgraded: the same object, with our handling
            protocol.__class__ = _H2Protocol


class _KeepAliveTimer:
    """The keep-alive timer of one asyncio connection, in place of Hypercorn's `AsyncioSingleTask`.

    Hypercorn cancels and recreates a task (which waits in `asyncio.wait_for`) every time a request
    leaves the connection idle: two task switches, a lock and a timer per request. Here one task per
    connection sleeps until the end of the idle time, which each request moves; it wakes once per
    `keep_alive_timeout` at most, and at shutdown (the worker context's `terminated`).
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._idle_since: float | None = None
        self._task: Any = None

    async def restart(self, task_group: Any, action: Any) -> None:
        """The connection went idle (Hypercorn's call; `action` is its own idle task, not used)."""
        conn = self._conn
        if conn.peer_closed:
            return  # nothing more can arrive: the connection ends instead of idling
        if conn.context.terminated.is_set():  # stopping: an idle connection closes now
            self._idle_since = -math.inf
        else:
            self._idle_since = conn.loop.time()
        if self._task is None:
            self._task = task_group._task_group.create_task(self._watch())

    async def stop(self) -> None:
        """A request started (or the connection is closing)."""
        self._idle_since = None

    async def close(self) -> None:
        import asyncio

        self._idle_since = None
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        import asyncio

        conn = self._conn
        keep_alive, terminated = conn.config.keep_alive_timeout, conn.context.terminated
        while True:
            since = self._idle_since
            wait = keep_alive if since is None else since + keep_alive - conn.loop.time()
            if wait <= 0 or (since is not None and terminated.is_set()):
                break
            with suppress(TimeoutError):
                await asyncio.wait_for(terminated.wait(), wait)
            if terminated.is_set() and self._idle_since is None:
                self._task = None  # busy at shutdown: `restart` closes it once its requests end
                return
        self._task = None
        await conn._initiate_server_close()


@functools.cache
def _asyncio_connection() -> type[Any]:
    from hypercorn.asyncio.tcp_server import TCPServer

    class Connection(TCPServer):
        """Closes as soon as the client has closed its side and no request of it runs (Hypercorn
        would wait for the keep-alive timeout, holding the socket in CLOSE-WAIT); one keep-alive
        timer task per connection, not one per request."""

        peer_closed = False

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.idle_task = _KeepAliveTimer(self)  # type: ignore[assignment]  # the same interface

        async def _read_data(self) -> None:
            self.protocol = _Protocol(self.protocol)  # type: ignore[assignment]  # the same interface
            await super()._read_data()
            self.peer_closed = True
            await self.idle_task.close()  # type: ignore[attr-defined]

        async def _close(self) -> None:
            await super()._close()
            await self.idle_task.close()  # type: ignore[attr-defined]

    return Connection


@functools.cache
def _trio_connection() -> type[Any]:
    from hypercorn.events import Event, Updated
    from hypercorn.trio.tcp_server import TCPServer

    class Connection(TCPServer):
        """The trio twin of `_asyncio_connection`."""

        peer_closed = False

        async def _read_data(self) -> None:
            self.protocol = _Protocol(self.protocol)  # type: ignore[assignment]  # the same interface
            await super()._read_data()
            self.peer_closed = True
            await self.idle_task.stop()

        async def protocol_send(self, event: Event) -> None:
            if isinstance(event, Updated) and event.idle and self.peer_closed:
                return
            await super().protocol_send(event)

    return Connection


async def _serve_asyncio(
    app: AppWrapper, config: Config, context: Any, conn: socket.socket, tls: SSLContext | None
) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    if tls is None:
        reader, writer = await asyncio.open_connection(sock=conn)
    else:  # what `asyncio.start_server` does with an accepted socket; the handshake happens here
        reader = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock=conn, ssl=tls, ssl_handshake_timeout=config.ssl_handshake_timeout
        )
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    await _asyncio_connection()(app, loop, config, context, {}, reader, writer)


_STREAM_LIMIT = 2**16
"""asyncio's default buffer limit of a stream reader."""


async def _serve_trio(
    app: AppWrapper, config: Config, context: Any, conn: socket.socket, tls: SSLContext | None
) -> None:
    import trio

    stream: Any = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
    if tls is not None:  # Hypercorn's connection runs the handshake (within ssl_handshake_timeout)
        stream = trio.SSLStream(stream, tls, server_side=True, https_compatible=True)
    try:
        await _trio_connection()(app, config, context, {}, stream)
    finally:
        conn.close()  # Hypercorn returns without closing when the handshake fails; else a no-op
