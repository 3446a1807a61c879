"""How the server stops: the first SIGTERM or SIGINT (or the `stop` event of `server.serve`)
starts a drain; a second one, or the end of `shutdown_grace_s`, forces the stop.

Draining, in this order:

1. Readiness turns 503: the HTTP listener keeps accepting, but a connection accepted from now on
   is answered by `draining_app` (`/health/ready` 503, `/health/live` 200, anything
   else 503 `shutting_down` with `Retry-After`), so that a load balancer's probe and a late client
   get an answer rather than a refused connection. gRPC calls started from now get UNAVAILABLE.
2. No new request is taken: keep-alive connections close once their running requests are
   answered (idle ones at once; HTTP/2 refuses new streams), and the job runner claims no more
   jobs, so queued async jobs stay queued in the store for another replica or the next start.
3. What was accepted runs to its end: HTTP requests, gRPC calls and running jobs, whose requests
   the scheduler and the workers keep serving.
4. Once none is left, or when the stop is forced, the listeners close, what still runs is
   cancelled (a running job is put back in the queue), the workers end (forced: SIGKILL at once,
   else within `worker_stop_grace_s` after their Shutdown message), every segment is unlinked and
   `mm serve` exits 0.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

if TYPE_CHECKING:
    from .api.grpc import GrpcListener
    from .httpserver import HttpListener
    from .jobs import JobRunner
    from .scheduler import Scheduler

__all__ = ("FORCED_ANSWER_S", "Shutdown", "drain", "draining_app", "kill_workers_when_forced")

log = structlog.get_logger("modelmora.server")

FORCED_ANSWER_S = 1.0
"""When the stop is forced: how long connections may take to send the 503 of requests cut short."""
_SHUTTING_DOWN_BODY = msgspec.json.encode(
    {"error": {"code": "shutting_down", "message": "the server is shutting down; retry (another replica)"}}
)
_READY_BODY = msgspec.json.encode({"status": "unavailable", "reason": "the server is shutting down"})
_LIVE_BODY = msgspec.json.encode({"status": "ok"})
_LIVE_PATHS = frozenset({"/health/live", "/v2/health/live"})
_READY_PATHS = frozenset({"/health/ready", "/v2/health/ready"})
_DRAIN_READ_LIMIT = 1 << 16
"""Request body bytes `draining_app` reads before answering (so that closing sends FIN, not RST)."""


class Shutdown:
    """The stop of one server: `draining` is set when the drain begins, `forced` when what still
    runs must be cut.

    Args:
        grace_s: the longest the drain may take (`shutdown_grace_s`) before the stop is forced.
        stop: an event that starts the drain when set (default: a new one); signals set it too.
    """

    def __init__(self, grace_s: float, stop: anyio.Event | None = None) -> None:
        self.grace_s = grace_s
        self.draining = stop if stop is not None else anyio.Event()
        self.forced = anyio.Event()

    def force(self, reason: str) -> None:
        """Cut what still runs now (no-op once forced)."""
        if not self.forced.is_set():
            log.warning("shutdown_forced", reason=reason)
            self.draining.set()
            self.forced.set()

    async def watch(self) -> None:
        """Until cancelled: the first SIGINT or SIGTERM starts the drain, the next forces the stop,
        and so does the end of the grace period."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._grace)
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not self.draining.is_set():
                        log.info("shutdown_requested", signal=name, grace_s=self.grace_s)
                        self.draining.set()
                    else:
                        self.force(f"a second {name}")

    async def _grace(self) -> None:
        await self.draining.wait()
        with anyio.CancelScope() as scope:
            scope.deadline = anyio.current_time() + self.grace_s
            await self.forced.wait()
        if scope.cancelled_caught:
            self.force(f"shutdown_grace_s ({self.grace_s:g} s) passed")

    async def until_idle(self, *waits: Callable[[], Awaitable[object]]) -> bool:
        """Wait until every one of `waits` has returned (True), or the stop is forced (False)."""
        idle = False
        async with anyio.create_task_group() as tg:

            async def all_of() -> None:
                nonlocal idle
                for wait in waits:
                    await wait()
                idle = True
                tg.cancel_scope.cancel()

            async def forced() -> None:
                await self.forced.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(all_of)
            tg.start_soon(forced)
        return idle


async def draining_app(scope: Any, receive: Any, send: Any) -> None:
    """What a connection accepted while the server drains is answered: `/health/live` 200,
    `/health/ready` 503, anything else 503 `shutting_down` with `Retry-After: 1` (the request's
    body read first, up to a limit)."""
    if scope["type"] != "http":
        return
    path = scope.get("path", "")
    if path in _LIVE_PATHS:
        status, body = 200, _LIVE_BODY
    else:
        status, body = 503, _READY_BODY if path in _READY_PATHS else _SHUTTING_DOWN_BODY
    read, more = 0, True
    while more and read <= _DRAIN_READ_LIMIT:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client went away
        read += len(message.get("body", b""))
        more = bool(message.get("more_body", False))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    if str(scope.get("http_version", "1.1")).startswith("1"):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def drain(
    shutdown: Shutdown,
    listener: HttpListener,
    grpc: GrpcListener | None,
    runner: JobRunner,
    *,
    stop_now: Callable[[], object],
    cut: anyio.Event,
) -> None:
    """Wait for the drain to begin, stop the job runner claiming jobs, then wait until every HTTP
    connection, gRPC call and job accepted before it has ended; then set `cut` (the listeners
    close, cancelling what is left).

    When the stop is forced first, `stop_now` fails what still runs (its running jobs go back to
    the queue, its queued and running requests get 503 "the server is shutting down"), and the
    connections get `FORCED_ANSWER_S` to send those answers before `cut`: a client then reads an
    error it may retry rather than a reset or a 500.
    """
    await shutdown.draining.wait()
    runner.drain()
    log.info(
        "draining",
        connections=listener.open,
        grpc_calls=grpc.calls.running if grpc is not None else None,
        jobs=runner.statistics()["running"],
        grace_s=shutdown.grace_s,
    )
    served = [listener.wait_served] if grpc is None else [listener.wait_served, grpc.calls.wait_idle]
    if await shutdown.until_idle(*served, runner.wait_idle):
        log.info("drained")
    else:
        stop_now()
        with anyio.move_on_after(FORCED_ANSWER_S):
            for wait in served:
                await wait()
    cut.set()


async def kill_workers_when_forced(shutdown: Shutdown, scheduler: Scheduler) -> None:
    """Started once the scheduler is closed: when the stop is forced, its workers are killed at
    once rather than given `worker_stop_grace_s` to finish their batches."""
    await shutdown.forced.wait()
    for rt in list(scheduler.models.values()):
        if rt.worker is not None and not rt.worker.dead:
            rt.worker.kill()
