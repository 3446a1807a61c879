"""WorkerHandle: one live worker process, seen from the supervisor.

`WorkerHandle.open()` creates the shared segment (two rings), starts the process through a
`Launcher` (spawn, or a fork of the zygote: see `launch`), does the Hello/Load/Loaded
handshake under a deadline and, on exit, stops the process (Shutdown, then SIGKILL after a
grace period) and unlinks every segment, however the worker ended.
`read_loop()` must run in a task beside the user of `infer()`: it turns Result/Error
messages into results and, when the channel closes, fails exactly the batches in flight.

`start_ms` in `statistics()` splits the cold start: `launch` (spawn or fork call),
`boot` (until the worker's Hello: interpreter start-up, or the child's set-up after a fork),
`import`, `load` and `warmup` (as the worker measured them), and `total` (launch to ready).
"""

from __future__ import annotations

import contextlib
import math
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import anyio.abc
import structlog

from ..errors import InvalidInput, ModelLoadFailed, ModelMoraError, ModelUnavailable, SharedMemoryFull, WorkerCrashed
from ..ipc import messages as m
from ..ipc import segments
from ..ipc.control import FrameDecoder, ProtocolError, encode_frame
from ..ipc.ring import PayloadTooLarge, ShmRing
from .launch import Launcher, SpawnLauncher, WorkerProcess, worker_environment

__all__ = ("EventSink", "InputList", "Output", "Outputs", "TensorData", "WorkerError", "WorkerHandle", "WorkerSpec")

log = structlog.get_logger("modelmora.worker")


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
    options: dict[str, Any] = field(default_factory=dict)
    streams: int = 1
    """Batches the worker may run at once (see `messages.Load.streams`)."""


@dataclass(frozen=True, slots=True)
class TensorData:
    """An output array copied out of the response ring (the supervisor has no numpy)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def rows(self) -> list[list[float]]:
        """A 2-D float32 array as Python lists."""
        if self.dtype != "<f4" or len(self.shape) != 2:
            raise TypeError(f"expected a 2-D <f4 array, got {self.dtype} {self.shape}")
        flat = memoryview(self.data).cast("f")
        n, d = self.shape
        return [cast("list[float]", flat[i * d : (i + 1) * d].tolist()) for i in range(n)]

    def slice_rows(self, start: int, stop: int) -> TensorData:
        """Rows [start, stop) along the first dimension."""
        n = self.shape[0]
        row = len(self.data) // n if n else 0
        return TensorData(self.dtype, (stop - start, *self.shape[1:]), self.data[start * row : stop * row])

    def row_bytes(self) -> list[bytes]:
        n = self.shape[0] if self.shape else 0
        size = len(self.data) // n if n else 0
        return [self.data[i * size : (i + 1) * size] for i in range(n)]


Output = TensorData | list[str] | list[bytes] | list[TensorData]
"""One output of a batch: an array with a row per item, or one str / bytes / array per item."""
Outputs = dict[str, Output]
InputList = list[str] | list[bytes] | list[TensorData]
"""One input of a batch: texts, byte strings, or arrays of one dtype (e.g. RGB images)."""
EventSink = Callable[[int, str, dict[str, Any]], None]
"""Receives a running batch's events: (item index or -1, kind, data)."""


def _pack(name: str, values: InputList) -> tuple[list[bytes], Callable[[m.Span], m.Input]]:
    """The bytes to place for one input list, and how to describe them once placed."""
    if not values or isinstance(values[0], str):
        encoded = [cast("str", v).encode("utf-8") for v in values]
        return encoded, lambda span: m.Text(span, [len(b) for b in encoded])
    if isinstance(values[0], bytes):
        blobs = values
        return blobs, lambda span: m.Blobs(span, [len(b) for b in blobs])
    arrays = values
    dtype = arrays[0].dtype
    if any(a.dtype != dtype for a in arrays):
        raise TypeError(f"input {name!r}: arrays of one batch must share a dtype")
    return [a.data for a in arrays], lambda span: m.Arrays(span, dtype, [a.shape for a in arrays])


def _unpack(item: m.Input, raw: bytes) -> Output:
    match item:
        case m.Tensor(dtype=dtype, shape=shape):
            return TensorData(dtype, tuple(shape), raw)
        case m.Text(lengths=lengths):
            return [b.decode("utf-8") for b in m.split(raw, lengths)]
        case m.Blobs(lengths=lengths):
            return m.split(raw, lengths)
        case m.Arrays(dtype=dtype, shapes=shapes):
            size = int(dtype[2:])  # numpy dtype strings: byte order, kind, item size ("|u1", "<f4")
            lengths = [math.prod(s) * size for s in shapes]
            return [TensorData(dtype, tuple(s), b) for s, b in zip(shapes, m.split(raw, lengths), strict=True)]
    raise ProtocolError(f"unknown output kind {type(item).__name__}")  # pragma: no cover - the union is closed


class WorkerError(ModelMoraError):
    """The worker reported that a batch failed (not a crash)."""

    http_status = 500
    code = "inference_failed"


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
        self.loaded: m.Loaded | None = None
        self.started_at = time.monotonic()
        self.ready_at = 0.0
        self.start_ms: dict[str, float] = {}
        self.forked = False
        self._hello_at = 0.0
        self.on_phase: Callable[[str], None] | None = None
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
        on_phase: Callable[[str], None] | None = None,
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
                        process = await launcher.launch(child_sock, worker_env, spec)
                    finally:
                        child_sock.close()
                    t_launched = time.perf_counter()
                    stream = await anyio.abc.UNIXSocketStream.from_socket(parent_sock)
                    handle = cls(spec, process, stream, shm, requests, responses, pool)
                    handle.on_phase = on_phase
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
            "import": float(loaded.info.get("import_ms", 0.0)),
            "load": loaded.load_ms,
            "warmup": loaded.warmup_ms,
            "total": total,
        }
        self.forked = bool(loaded.info.get("forked", False))

    async def _recv(self) -> m.Message | None:
        while not self._backlog:
            try:
                data = await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return None
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
                spec.options,
                spec.streams,
            )
        )
        reply = await self._recv()
        while isinstance(reply, m.Event):  # the worker's load phases
            if reply.kind == "phase" and self.on_phase is not None:
                self.on_phase(str(reply.data.get("phase", "")))
            reply = await self._recv()
        if isinstance(reply, m.Error):
            raise ModelLoadFailed(f"model {spec.model_id!r} failed to load: {reply.message}")
        if not isinstance(reply, m.Loaded):
            raise ModelLoadFailed(f"model {spec.model_id!r}: worker died while loading")
        self.loaded = reply
        self.vram_bytes = int(reply.info.get("vram_bytes", 0))
        self.streams = max(1, int(reply.info.get("streams", 1)))
        self.ready_at = time.monotonic()
        log.info(
            "worker_ready",
            model=spec.model_id,
            pid=self.pid,
            forked=bool(reply.info.get("forked", False)),
            import_ms=round(float(reply.info.get("import_ms", 0.0)), 1),
            load_ms=round(reply.load_ms, 1),
            warmup_ms=round(reply.warmup_ms, 1),
            rss_mb=round(reply.rss_bytes / 2**20, 1),
            device=reply.device,
        )

    async def _stop(self, grace_s: float) -> None:
        """Ask the worker to exit, SIGKILL it after `grace_s`, wait for it, fail what it held."""
        if not self.dead:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self._send(m.Shutdown())
        with anyio.move_on_after(grace_s) as scope:
            await self.process.wait()
        if scope.cancelled_caught:
            self.process.kill()
            await self.process.wait()
        self._mark_dead(crashed=False)
        log.info("worker_stopped", model=self.spec.model_id, pid=self.pid, returncode=self.process.returncode)

    def _mark_dead(self, *, crashed: bool) -> None:
        if self.dead:
            return
        self.dead = True
        self.crashed = crashed
        err = WorkerCrashed(
            f"the worker of model {self.spec.model_id!r} exited while running this request", retry_after_s=1.0
        )
        for slot in self._slots.values():
            if not slot.event.is_set():
                slot.error = err
                slot.event.set()
        self._slots.clear()
        self._progress.set()

    async def read_loop(self) -> None:
        """Deliver results until the worker's channel closes; then fail what is in flight."""
        try:
            while True:
                msg = await self._recv()
                if msg is None:
                    break
                self._dispatch(msg)
                self._progress.set()
                self._progress = anyio.Event()
        except ProtocolError:
            log.exception("worker_protocol_error", model=self.spec.model_id, pid=self.pid)
            self.process.kill()
        crashed = not self.dead
        if crashed:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(1.0):
                    await self.process.wait()
            log.warning("worker_crashed", model=self.spec.model_id, pid=self.pid, returncode=self.process.returncode)
        self._mark_dead(crashed=crashed)

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
                    data[name] = _unpack(item, raw)
                self._resolve(bid, data, None)
            case m.Event(batch_id=bid, item=item, kind=kind, data=payload):
                slot = self._slots.get(bid)
                if slot is not None and slot.on_event is not None:
                    slot.on_event(item, kind, payload)
            case m.Error(batch_id=bid, code=code, message=message, field=fld):
                err: ModelMoraError
                if code == "invalid_input":
                    err = InvalidInput(message, field=fld or None)
                elif code == "cancelled":
                    err = ModelUnavailable(f"model {self.spec.model_id!r}: the request was cancelled")
                else:
                    err = WorkerError(f"model {self.spec.model_id!r}: {code}")
                    log.error("worker_batch_failed", model=self.spec.model_id, code=code, detail=message)
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
        except PayloadTooLarge as exc:  # pragma: no cover - checked above
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
        they arrive, on the event loop.

        Raises:
            WorkerCrashed: the worker died (before or) while running the batch.
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
                    chunks, build = _pack(name, values)
                    span, big = await self._place(chunks)
                    if big:
                        large.append(big)
                    wire[name] = build(span)
            except BaseException:
                for big in large:  # the batch never reached the worker: its large segments are free again
                    self._pool.release(big)
                raise
            slot = self._slots[bid] = _Slot(large, on_event)
            try:
                await self._send(m.Infer(bid, wire, params))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._slots.pop(bid, None)
                raise WorkerCrashed(f"the worker of model {self.spec.model_id!r} is gone", retry_after_s=1.0) from exc
        await slot.event.wait()  # if cancelled, the slot stays until the worker answers; the result is dropped
        if slot.error is not None:
            raise slot.error
        assert slot.value is not None
        return slot.value

    def statistics(self) -> dict[str, Any]:
        loaded = self.loaded
        return {
            "pid": self.pid,
            "in_flight_batches": len(self._slots),
            "streams": self.streams,
            "rss_mb": round(loaded.rss_bytes / 2**20, 1) if loaded else None,
            "device": loaded.device if loaded else None,
            "load_ms": round(loaded.load_ms, 1) if loaded else None,
            "forked": self.forked,
            "start_ms": {k: round(v, 1) for k, v in self.start_ms.items()},
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "request_ring_used_bytes": self.requests.statistics().used_bytes,
            "vram_mb": round(self.vram_bytes / 2**20, 1),
        }
