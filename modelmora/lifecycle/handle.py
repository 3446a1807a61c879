"""WorkerHandle: one live worker process, seen from the supervisor.

`WorkerHandle.open()` creates the shared segment (two rings), starts the process through a
`Launcher` (spawn, or a fork of the zygote: see `launch`), does the Hello/Load/Loaded
handshake under a deadline and, on exit, stops the process (Shutdown, then SIGKILL after a
grace period) and unlinks every segment, however the worker ended.
A handle is a `WorkerChannel` (`channel`: `infer()`, `read_loop()`, which must run in a task
beside the users of `infer()`, the batches in flight, the stall watchdog, cancellation).

`start_ms` in `statistics()` splits the cold start: `launch` (spawn or fork call),
`boot` (until the worker's Hello: interpreter start-up, or the child's set-up after a fork),
`import`, `load` and `warmup` (as the worker measured them), and `total` (launch to ready).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import msgspec
import structlog

from ..errors import ModelLoadFailed
from ..ipc import messages as m
from ..ipc import segments
from ..ipc.pool import SegmentPool
from ..ipc.ring import ShmRing
from .channel import WorkerChannel
from .launchers import Launcher, SpawnLauncher, WorkerProcess, worker_environment

__all__ = (
    "DEFAULT_STALL_S",
    "PhaseSink",
    "WorkerHandle",
    "WorkerSpec",
    "WorkerStatistics",
    "heartbeat_interval",
)

log = structlog.get_logger("modelmora.worker")

DEFAULT_STALL_S = 30.0
"""A worker silent this long is stalled (the `worker_stall_s` setting's default)."""
_MAX_HEARTBEAT_S = 5.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker should load."""

    model_id: str
    version: str
    path: str
    task: str
    pipeline: str
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 1
    streams: int = 1
    """Batches the worker may run at once (see `messages.Load.streams`)."""


PhaseSink = Callable[[str], None]
"""Receives the worker's load phases ("warming") during the handshake."""


def heartbeat_interval(stall_s: float) -> float:
    """How often a worker says it runs, for a watchdog that gives up after `stall_s` (0: never):
    a quarter of it, at most every 5 s."""
    return 0.0 if stall_s <= 0 else min(stall_s / 4, _MAX_HEARTBEAT_S)


class WorkerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one worker, for the status endpoint."""

    pid: int
    in_flight_batches: int
    """Batches sent and not answered yet."""
    streams: int
    """Batches the worker runs at once."""
    rss_mb: float | None
    """Resident memory once loaded (as the worker measured it)."""
    device: str | None
    load_ms: float | None
    forked: bool
    """Whether the worker is a fork of the zygote."""
    start_ms: dict[str, float]
    """The cold start: launch, boot, import, load, warmup, total."""
    uptime_s: float
    request_ring_used_bytes: int
    vram_mb: float
    """GPU memory the worker holds, as it last reported."""
    ring_bytes: int = 0
    """Shared memory of its two rings."""
    pool_bytes: int = 0
    """Shared memory of its pool of large payload segments (in use and kept warm)."""
    pool_in_use_bytes: int = 0


class WorkerHandle(WorkerChannel):
    """A running worker. Create with `WorkerHandle.open(...)`."""

    def __init__(
        self,
        spec: WorkerSpec,
        process: WorkerProcess,
        stream: anyio.abc.SocketStream,
        shm: Any,
        requests: ShmRing,
        responses: ShmRing,
        pool: SegmentPool,
    ) -> None:
        super().__init__(spec.model_id, process, stream, requests, responses, pool)
        self.spec = spec
        self._shm = shm
        self.loaded: m.Loaded | None = None
        self.started_at = time.monotonic()
        self.ready_at = 0.0
        self.start_ms: dict[str, float] = {}
        self.forked = False
        self._hello_at = 0.0
        self.on_phase: PhaseSink | None = None
        """Called with the worker's load phases ("warming") during the handshake."""
        self.streams = 1
        """Batches the worker runs at once (what it reported at load)."""

    # -- lifecycle --------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        spec: WorkerSpec,
        *,
        instance_id: str,
        request_ring_bytes: int,
        response_ring_bytes: int,
        start_timeout_s: float,
        stop_grace_s: float,
        env: Mapping[str, str] | None = None,
        launcher: Launcher | None = None,
        on_phase: PhaseSink | None = None,
        stall_s: float = DEFAULT_STALL_S,
    ) -> AsyncIterator[WorkerHandle]:
        """Start a worker for `spec` and yield it once the model is ready.

        Args:
            spec: what to load.
            instance_id: the server instance owning the segments.
            request_ring_bytes: capacity of the supervisor->worker ring.
            response_ring_bytes: capacity of the worker->supervisor ring.
            start_timeout_s: deadline for starting, loading and warming up.
            stop_grace_s: how long a worker may take to exit after Shutdown before SIGKILL.
            env: the worker's environment (default: ours), with OMP/MKL thread counts added.
            launcher: how to start the process (default: spawn).
            on_phase: called with "warming" when the weights are loaded and the test inference starts.
            stall_s: once ready, a worker that sends no message (result, event, heartbeat) for
                this long is killed as stalled (see `read_loop`); 0 disables the watchdog.

        Raises:
            ModelLoadFailed: the process failed to start, load or warm up in time.
        """
        launcher = launcher or SpawnLauncher()
        req_size = ShmRing.region_size(request_ring_bytes)
        try:
            shm = segments.create(instance_id, "w", req_size + ShmRing.region_size(response_ring_bytes))
        except segments.SharedMemoryExhausted as exc:
            raise ModelLoadFailed(f"model {spec.model_id!r}: no room for the worker's rings: {exc}") from exc
        pool = SegmentPool(instance_id, "big")
        buf = shm.buf
        assert buf is not None
        requests = ShmRing(buf[:req_size], request_ring_bytes, init=True)
        responses = ShmRing(buf[req_size:], response_ring_bytes, init=True)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker_env = worker_environment(env, spec.threads)
        process: WorkerProcess | None = None
        stream: anyio.abc.SocketStream | None = None
        handle: WorkerHandle | None = None
        try:
            t0 = time.perf_counter()
            try:
                with anyio.fail_after(start_timeout_s):
                    try:
                        process = await launcher.launch(child_sock, worker_env, spec.model_id)
                    finally:
                        child_sock.close()
                    t_launched = time.perf_counter()
                    stream = await anyio.abc.UNIXSocketStream.from_socket(parent_sock)
                    handle = cls(spec, process, stream, shm, requests, responses, pool)
                    handle.on_phase = on_phase
                    handle.stall_s = max(0.0, stall_s)
                    log.info("worker_starting", model=spec.model_id, version=spec.version, pid=process.pid)
                    await handle._handshake(shm.name, request_ring_bytes, response_ring_bytes)
            except TimeoutError as exc:
                raise ModelLoadFailed(
                    f"model {spec.model_id!r} did not become ready within {start_timeout_s:g} s"
                ) from exc
            assert handle is not None
            handle._record_start(t0, t_launched)
            yield handle
        finally:
            with anyio.CancelScope(shield=True):
                if handle is not None:
                    await handle._stop(stop_grace_s)
                elif process is not None:
                    process.kill()
                    await process.wait()
                if process is not None:
                    process.close()
                if stream is not None:
                    await stream.aclose()
                else:
                    parent_sock.close()
                requests.close()
                responses.close()
                segments.unlink(shm)
                pool.close()

    def _record_start(self, t0: float, t_launched: float) -> None:
        loaded = self.loaded
        assert loaded is not None
        total = (time.perf_counter() - t0) * 1e3
        self.start_ms = {
            "launch": (t_launched - t0) * 1e3,
            "boot": (self._hello_at - t_launched) * 1e3,
            "import": loaded.import_ms,
            "load": loaded.load_ms,
            "warmup": loaded.warmup_ms,
            "total": total,
        }
        self.forked = loaded.forked

    async def _handshake(self, segment: str, req_bytes: int, resp_bytes: int) -> None:
        spec = self.spec
        hello = await self._recv()
        self._hello_at = time.perf_counter()
        if not isinstance(hello, m.Hello):
            raise ModelLoadFailed(f"model {spec.model_id!r}: worker exited before saying hello")
        if hello.protocol != m.PROTOCOL_VERSION:
            raise ModelLoadFailed(
                f"worker speaks protocol {hello.protocol}, supervisor {m.PROTOCOL_VERSION}: reinstall modelmora"
            )
        await self._send(
            m.Load(
                segment,
                req_bytes,
                resp_bytes,
                spec.model_id,
                spec.version,
                spec.path,
                spec.task,
                spec.pipeline,
                spec.device,
                spec.dtype,
                spec.threads,
                spec.streams,
                heartbeat_interval(self.stall_s),
            )
        )
        reply = await self._recv()
        while isinstance(reply, m.Phase | m.Heartbeat):
            if isinstance(reply, m.Phase) and self.on_phase is not None:
                self.on_phase(reply.phase)
            reply = await self._recv()
        if isinstance(reply, m.Error):
            raise ModelLoadFailed(f"model {spec.model_id!r} failed to load: {reply.message}")
        if not isinstance(reply, m.Loaded):
            raise ModelLoadFailed(f"model {spec.model_id!r}: worker died while loading")
        self.loaded = reply
        self.vram_bytes = reply.vram_bytes
        self.streams = max(1, reply.streams)
        self.ready_at = time.monotonic()
        log.info(
            "worker_ready",
            model=spec.model_id,
            pid=self.pid,
            forked=reply.forked,
            import_ms=round(reply.import_ms, 1),
            load_ms=round(reply.load_ms, 1),
            warmup_ms=round(reply.warmup_ms, 1),
            rss_mb=round(reply.rss_bytes / 2**20, 1),
            device=reply.device,
        )

    def kill(self) -> None:
        """End the worker now (SIGKILL), as a stop rather than a crash (a forced server stop): its
        batches fail, and the stop that follows (`open`'s exit) finds it gone."""
        self._stopping = True
        self.process.kill()

    async def _stop(self, grace_s: float) -> None:
        """Ask the worker to exit, SIGKILL it after `grace_s`, wait for it, fail what it held.

        The grace period bounds sending `Shutdown` too: a stopped (SIGSTOP) or hung worker
        reads nothing, and once its socket buffer is full a send would wait forever.
        """
        self._stopping = True
        with anyio.move_on_after(grace_s) as scope:
            if not self.dead:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    await self._send(m.Shutdown())
            await self.process.wait()
        if scope.cancelled_caught:
            log.warning("worker_kill", model=self.spec.model_id, pid=self.pid, grace_s=grace_s)
            self.process.kill()
            await self.process.wait()
        self._mark_dead(crashed=False)
        log.info("worker_stopped", model=self.spec.model_id, pid=self.pid, returncode=self.process.returncode)

    def statistics(self) -> WorkerStatistics:
        """A snapshot of this worker (its fields are those of the status endpoint's `worker`)."""
        loaded = self.loaded
        pool = self._pool.statistics()
        return WorkerStatistics(
            pid=self.pid,
            in_flight_batches=len(self._slots),
            streams=self.streams,
            rss_mb=round(loaded.rss_bytes / 2**20, 1) if loaded else None,
            device=loaded.device if loaded else None,
            load_ms=round(loaded.load_ms, 1) if loaded else None,
            forked=self.forked,
            start_ms={k: round(v, 1) for k, v in self.start_ms.items()},
            uptime_s=round(time.monotonic() - self.started_at, 1),
            request_ring_used_bytes=self.requests.statistics().used_bytes,
            vram_mb=round(self.vram_bytes / 2**20, 1),
            ring_bytes=self._shm.size,
            pool_bytes=pool.total_bytes,
            pool_in_use_bytes=pool.in_use_bytes,
        )
