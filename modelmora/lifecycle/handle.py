"""WorkerHandle: one live worker process, seen from the supervisor.

`WorkerHandle.open()` creates the shared segment (two rings), starts the process through a
`Launcher` (spawn, or a fork of the zygote: see `launch`), does the Hello/Load/Loaded
handshake under a deadline and, on exit, stops the process (Shutdown, then SIGKILL after a
grace period) and unlinks every segment, however the worker ended.
`read_loop()` must run in a task beside the user of `infer()`: it turns Result/Error
messages into results and, when the channel closes, fails exactly the batches in flight.

Liveness: the worker sends a `Heartbeat` every `heartbeat_interval(stall_s)` from a thread
of its own. While `read_loop()` runs, a worker that sends no message of any kind for
`stall_s` (stopped, or hung where not even that thread runs) is stalled: the handle logs it,
kills the process (SIGKILL), and fails the batches it held with `WorkerCrashed`, as for a
crash (`crashed` True, `crash_reason` "stalled").

Cancellation: a caller cancelled inside `infer()` once the batch was sent tells the worker
(a `Cancel` message, sent shielded), which stops the batch at the pipeline's next step.

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

from ..errors import (
    InvalidInput,
    ModelLoadFailed,
    ModelMoraError,
    ModelUnavailable,
    SharedMemoryFull,
    WorkerCrashed,
    WorkerError,
)
from ..ipc import messages as m
from ..ipc import segments
from ..ipc.control import FrameDecoder, ProtocolError, encode_frame
from ..ipc.payloads import InputList, Outputs, pack, unpack
from ..ipc.ring import ExceedsRing, ShmRing
from .launchers import Launcher, SpawnLauncher, WorkerProcess, worker_environment

__all__ = (
    "DEFAULT_STALL_S",
    "EventSink",
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
_CANCEL_SEND_S = 1.0
"""How long a cancelled caller may spend telling the worker (the channel is full: it is stuck)."""


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


EventSink = Callable[[int, str, dict[str, Any]], None]
"""Receives a running batch's events: (item index or -1, kind, data)."""
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


class _Slot:
    __slots__ = ("error", "event", "large", "on_event", "value")

    def __init__(self, large: list[str], on_event: EventSink | None) -> None:
        self.event = anyio.Event()
        self.value: Outputs | None = None
        self.error: BaseException | None = None
        self.large = large
        self.on_event = on_event


class WorkerHandle:
    """A running worker. Create with `WorkerHandle.open(...)`."""

    def __init__(
        self,
        spec: WorkerSpec,
        process: WorkerProcess,
        stream: anyio.abc.SocketStream,
        shm: Any,
        requests: ShmRing,
        responses: ShmRing,
        pool: segments.SegmentPool,
    ) -> None:
        self.spec = spec
        self.process = process
        self.pid = process.pid
        self._stream = stream
        self._shm = shm
        self.requests = requests
        self.responses = responses
        self._pool = pool
        self._decoder = FrameDecoder()
        self._backlog: list[m.Message] = []
        self._slots: dict[int, _Slot] = {}
        self._next_batch = 0
        self._progress = anyio.Event()
        self._send_lock = anyio.Lock()
        self._infer_lock = anyio.Lock()
        """Held from placing a batch's inputs to sending its `Infer`: the worker sees batches in
        the order of their request-ring spans, which it releases in that order."""
        self.dead = False
        self.crashed = False
        self.crash_reason: str | None = None
        """Why a crashed worker ended: "exited" (it died), "stalled" (the watchdog killed it)."""
        self.stall_s = 0.0
        """No message for this long is a stall (0: no watchdog)."""
        self._last_message_at = 0.0
        self._stopping = False
        """Set once `_stop` asked the worker to exit: its end is then no crash."""
        self.loaded: m.Loaded | None = None
        self.started_at = time.monotonic()
        self.ready_at = 0.0
        self.start_ms: dict[str, float] = {}
        self.forked = False
        self._hello_at = 0.0
        self.on_phase: PhaseSink | None = None
        """Called with the worker's load phases ("warming") during the handshake."""
        self.vram_bytes = 0
        """GPU memory the worker holds, as it last reported (at load and after each batch)."""
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
        pool = segments.SegmentPool(instance_id, "big")
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

    async def _recv(self) -> m.Message | None:
        while not self._backlog:
            try:
                data = await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return None
            self._last_message_at = anyio.current_time()
            self._backlog.extend(self._decoder.feed(data))
        return self._backlog.pop(0)

    async def _send(self, msg: m.Message) -> None:
        async with self._send_lock:
            await self._stream.send(encode_frame(msg))

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

    def _mark_dead(self, *, crashed: bool, reason: str = "exited") -> None:
        if self.dead:
            return
        self.dead = True
        self.crashed = crashed
        if crashed:
            self.crash_reason = reason
        what = "stalled" if reason == "stalled" else "exited"
        err = WorkerCrashed(
            f"the worker of model {self.spec.model_id!r} {what} while running this request", retry_after_s=1.0
        )
        for slot in self._slots.values():
            if not slot.event.is_set():
                slot.error = err
                slot.event.set()
        self._slots.clear()
        self._progress.set()

    async def read_loop(self) -> None:
        """Deliver results until the worker's channel closes; then fail what is in flight.

        With a watchdog (`stall_s` > 0), a worker that sends nothing for `stall_s` is killed as
        stalled and this returns at once.
        """
        self._last_message_at = anyio.current_time()
        async with anyio.create_task_group() as tg:
            if self.stall_s > 0:
                tg.start_soon(self._watchdog, tg.cancel_scope)
            await self._read()
            tg.cancel_scope.cancel()

    async def _read(self) -> None:
        try:
            while True:
                msg = await self._recv()
                if msg is None:
                    break
                if isinstance(msg, m.Heartbeat):
                    continue
                self._dispatch(msg)
                self._progress.set()
                self._progress = anyio.Event()
        except ProtocolError:
            log.exception("worker_protocol_error", model=self.spec.model_id, pid=self.pid)
            self.process.kill()
        crashed = not self.dead and not self._stopping
        if crashed:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(1.0):
                    await self.process.wait()
            log.warning("worker_crashed", model=self.spec.model_id, pid=self.pid, returncode=self.process.returncode)
        self._mark_dead(crashed=crashed)

    async def _watchdog(self, reader: anyio.CancelScope) -> None:
        """Kill the worker once it has been silent for `stall_s`, and stop the reader."""
        # each message moves the deadline; sleeping until it is one wake-up per stall_s, not a poll
        while (deadline := self._last_message_at + self.stall_s) > anyio.current_time():  # noqa: ASYNC110
            await anyio.sleep_until(deadline)
        if self.dead:
            return
        log.error(
            "worker_stalled",
            model=self.spec.model_id,
            pid=self.pid,
            stall_s=self.stall_s,
            in_flight_batches=len(self._slots),
        )
        self.process.kill()
        self._mark_dead(crashed=True, reason="stalled")
        reader.cancel()

    def _dispatch(self, msg: m.Message) -> None:
        match msg:
            case m.Result(batch_id=bid, outputs=outputs, vram_bytes=vram):
                self.vram_bytes = vram
                data = {}
                for name, item in outputs.items():
                    if item.span.seg:
                        raise ProtocolError("worker results must be in the response ring")
                    raw = self.responses.read(item.span)
                    self.responses.release(item.span)
                    data[name] = unpack(item, raw)
                self._resolve(bid, data, None)
            case m.Event(batch_id=bid, item=item, kind=kind, data=payload):
                slot = self._slots.get(bid)
                if slot is not None and slot.on_event is not None:
                    slot.on_event(item, kind, payload)
            case m.Error(batch_id=bid, code=code, message=message, field=fld):
                err: ModelMoraError
                match code:
                    case m.ErrorCode.INVALID_INPUT:
                        err = InvalidInput(message, field=fld or None)
                    case m.ErrorCode.CANCELLED:
                        log.info("worker_batch_cancelled", model=self.spec.model_id, pid=self.pid, batch=bid)
                        err = ModelUnavailable(f"model {self.spec.model_id!r}: the request was cancelled")
                    case _:
                        err = WorkerError(f"model {self.spec.model_id!r}: {code}")
                        log.error("worker_batch_failed", model=self.spec.model_id, code=str(code), detail=message)
                self._resolve(bid, None, err)
            case _:
                raise ProtocolError(f"unexpected message from worker: {type(msg).__name__}")

    def _resolve(self, batch_id: int, value: Outputs | None, error: BaseException | None) -> None:
        slot = self._slots.pop(batch_id, None)
        if slot is None:
            return
        for name in slot.large:
            self._pool.release(name)
        slot.value, slot.error = value, error
        slot.event.set()

    # -- requests ---------------------------------------------------------------------

    async def _place(self, chunks: list[bytes]) -> tuple[m.Span, str | None]:
        total = sum(len(c) for c in chunks)
        if total > self.requests.capacity:
            try:
                name, view = self._pool.acquire(total)
            except segments.SharedMemoryExhausted as exc:
                log.warning("shared_memory_exhausted", model=self.spec.model_id, needed=exc.needed, free=exc.free)
                raise SharedMemoryFull(
                    f"the server has no shared memory free for this request's input ({total} bytes); retry later",
                    retry_after_s=1.0,
                ) from exc
            pos = 0
            for c in chunks:
                view[pos : pos + len(c)] = c
                pos += len(c)
            view.release()
            return m.Span(name, 0, total), name
        while not self.requests.fits(total):
            if self.dead:
                raise WorkerCrashed(f"the worker of model {self.spec.model_id!r} is gone", retry_after_s=1.0)
            await self._progress.wait()
        try:
            return self.requests.write_nowait(*chunks), None
        except ExceedsRing as exc:  # pragma: no cover - checked above
            raise AssertionError from exc

    def new_batch_id(self) -> int:
        """Allocate the id of the next batch (to pass to `infer`, and to `cancel` it later)."""
        self._next_batch += 1
        return self._next_batch

    async def cancel(self, batch_id: int) -> None:
        """Ask the worker to stop a running batch at its pipeline's next step (best effort)."""
        if batch_id in self._slots and not self.dead:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self._send(m.Cancel(batch_id))

    async def infer(
        self,
        inputs: Mapping[str, InputList],
        params: dict[str, Any],
        *,
        batch_id: int | None = None,
        on_event: EventSink | None = None,
    ) -> Outputs:
        """Run one batch; returns the worker's outputs (one entry or row per input item).

        Inputs are written once into the request ring (or a pooled large segment); images
        travel as raw arrays. `on_event` receives the batch's events (tokens, progress) as
        they arrive, on the event loop. A caller cancelled here once the batch was sent tells
        the worker (`Cancel`, shielded), which stops it at the pipeline's next step; its
        segments stay held until the worker answers.

        Raises:
            WorkerCrashed: the worker died (before or) while running the batch, or stalled.
            InvalidInput: the pipeline refused the inputs.
            WorkerError: the pipeline failed.
        """
        if self.dead:
            raise WorkerCrashed(f"the worker of model {self.spec.model_id!r} is gone", retry_after_s=1.0)
        wire: dict[str, m.Input] = {}
        large: list[str] = []
        bid = self.new_batch_id() if batch_id is None else batch_id
        async with self._infer_lock:
            try:
                for name, values in inputs.items():
                    chunks, build = pack(name, values)
                    span, big = await self._place(chunks)
                    if big:
                        large.append(big)
                    wire[name] = build(span)
            except BaseException:  # cancelled (or refused) before the worker heard of it
                for big in large:  # its large segments are free again
                    self._pool.release(big)
                raise
            slot = self._slots[bid] = _Slot(large, on_event)
            try:
                # shielded: a frame is sent whole or the channel is broken (a stuck worker is the
                # watchdog's or `_stop`'s to kill); once sent, the worker owns the batch's segments
                with anyio.CancelScope(shield=True):
                    await self._send(m.Infer(bid, wire, params))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                if self._slots.pop(bid, None) is not None:
                    for name in large:
                        self._pool.release(name)
                raise WorkerCrashed(f"the worker of model {self.spec.model_id!r} is gone", retry_after_s=1.0) from exc
        try:
            await slot.event.wait()
        except anyio.get_cancelled_exc_class():
            if not slot.event.is_set():  # the slot stays until the worker answers; the answer is dropped
                with anyio.move_on_after(_CANCEL_SEND_S, shield=True):
                    await self.cancel(bid)
            raise
        if slot.error is not None:
            raise slot.error
        assert slot.value is not None
        return slot.value

    def statistics(self) -> WorkerStatistics:
        """A snapshot of this worker (its fields are those of the status endpoint's `worker`)."""
        loaded = self.loaded
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
        )
