"""The async control channel to one worker process, and its table of batches in flight.

`WorkerChannel` is the supervisor's end of a worker's control socket and rings: `infer()` writes
a batch's inputs once into the request ring (or a pooled large segment), sends `Infer` and waits
for its slot; `read_loop()`, in a task beside the callers, turns Result/Error/Event messages into
results and, when the channel closes, fails exactly the batches in flight. Starting, the
handshake and stopping are `WorkerHandle`'s (`handle`), which is a `WorkerChannel`.

Liveness: the worker sends a `Heartbeat` every `heartbeat_interval(stall_s)` from a thread
of its own. While `read_loop()` runs, a worker that sends no message of any kind for
`stall_s` (stopped, or hung where not even that thread runs) is stalled: the channel logs it,
kills the process (SIGKILL), and fails the batches it held with `WorkerCrashed`, as for a
crash (`crashed` True, `crash_reason` "stalled").

Cancellation: a caller cancelled inside `infer()` once the batch was sent tells the worker
(a `Cancel` message, sent shielded), which stops the batch at the pipeline's next step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
import structlog

from ..broadcast import Broadcast
from ..clock import event_loop_clock
from ..errors import (
    InvalidInput,
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
from ..ipc.pool import SegmentPool
from ..ipc.ring import ExceedsRing, ShmRing
from .launchers import WorkerProcess

__all__ = ("EventSink", "WorkerChannel")

log = structlog.get_logger("modelmora.worker")

_CANCEL_SEND_S = 1.0
"""How long a cancelled caller may spend telling the worker (the channel is full: it is stuck)."""

EventSink = Callable[[int, str, dict[str, Any]], None]
"""Receives a running batch's events: (item index or -1, kind, data)."""


class _Slot:
    __slots__ = ("error", "event", "large", "on_event", "value")

    def __init__(self, large: list[str], on_event: EventSink | None) -> None:
        self.event = anyio.Event()
        self.value: Outputs | None = None
        self.error: BaseException | None = None
        self.large = large
        self.on_event = on_event


class WorkerChannel:
    """The control channel and rings of the worker `process` serving `model_id`."""

    def __init__(
        self,
        model_id: str,
        process: WorkerProcess,
        stream: anyio.abc.SocketStream,
        requests: ShmRing,
        responses: ShmRing,
        pool: SegmentPool,
    ) -> None:
        self.model_id = model_id
        self.process = process
        self.pid = process.pid
        self._stream = stream
        self.requests = requests
        self.responses = responses
        self._pool = pool
        self._decoder = FrameDecoder()
        self._backlog: list[m.Message] = []
        self._slots: dict[int, _Slot] = {}
        self._next_batch = 0
        self._progress = Broadcast()
        """Notified at every message from the worker (ring space may have come back)."""
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
        self._now: Callable[[], float] = anyio.current_time
        """The event loop's clock (bound when the read loop starts)."""
        self._stopping = False
        """Set once the worker was asked to exit: its end is then no crash."""
        self.vram_bytes = 0
        """GPU memory the worker holds, as it last reported (at load and after each batch)."""
        self.on_infer_s: Callable[[float], None] | None = None
        """Receives the seconds the worker spent on each batch it answered, as it measured them."""

    async def _recv(self) -> m.Message | None:
        while not self._backlog:
            try:
                data = await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return None
            self._last_message_at = self._now()
            self._backlog.extend(self._decoder.feed(data))
        return self._backlog.pop(0)

    async def _send(self, msg: m.Message) -> None:
        async with self._send_lock:
            await self._stream.send(encode_frame(msg))

    def _mark_dead(self, *, crashed: bool, reason: str = "exited") -> None:
        if self.dead:
            return
        self.dead = True
        self.crashed = crashed
        if crashed:
            self.crash_reason = reason
        what = "stalled" if reason == "stalled" else "exited"
        err = WorkerCrashed(
            f"the worker of model {self.model_id!r} {what} while running this request", retry_after_s=1.0
        )
        for slot in self._slots.values():
            if not slot.event.is_set():
                slot.error = err
                slot.event.set()
        self._slots.clear()
        self._progress.notify()

    async def read_loop(self) -> None:
        """Deliver results until the worker's channel closes; then fail what is in flight.

        With a watchdog (`stall_s` > 0), a worker that sends nothing for `stall_s` is killed as
        stalled and this returns at once.
        """
        self._now = event_loop_clock()
        self._last_message_at = self._now()
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
                self._progress.notify()
        except ProtocolError:
            log.exception("worker_protocol_error", model=self.model_id, pid=self.pid)
            self.process.kill()
        crashed = not self.dead and not self._stopping
        if crashed:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(1.0):
                    await self.process.wait()
            log.warning("worker_crashed", model=self.model_id, pid=self.pid, returncode=self.process.returncode)
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
            model=self.model_id,
            pid=self.pid,
            stall_s=self.stall_s,
            in_flight_batches=len(self._slots),
        )
        self.process.kill()
        self._mark_dead(crashed=True, reason="stalled")
        reader.cancel()

    def _dispatch(self, msg: m.Message) -> None:
        match msg:
            case m.Result(batch_id=bid, outputs=outputs, infer_ms=infer_ms, vram_bytes=vram):
                self.vram_bytes = vram
                if self.on_infer_s is not None:
                    self.on_infer_s(infer_ms / 1e3)
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
                        log.info("worker_batch_cancelled", model=self.model_id, pid=self.pid, batch=bid)
                        err = ModelUnavailable(f"model {self.model_id!r}: the request was cancelled")
                    case _:
                        err = WorkerError(f"model {self.model_id!r}: {code}")
                        log.error("worker_batch_failed", model=self.model_id, code=str(code), detail=message)
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
                log.warning("shared_memory_exhausted", model=self.model_id, needed=exc.needed, free=exc.free)
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
                raise WorkerCrashed(f"the worker of model {self.model_id!r} is gone", retry_after_s=1.0)
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
        trace_ids: Sequence[str] = (),
    ) -> Outputs:
        """Run one batch; returns the worker's outputs (one entry or row per input item).

        Inputs are written once into the request ring (or a pooled large segment); images
        travel as raw arrays. `on_event` receives the batch's events (tokens, progress) as
        they arrive, on the event loop. A caller cancelled here once the batch was sent tells
        the worker (`Cancel`, shielded), which stops it at the pipeline's next step; its
        segments stay held until the worker answers. `trace_ids` (the W3C trace ids of the batch's
        requests) go with the batch: the worker's log lines about it carry them.

        Raises:
            WorkerCrashed: the worker died (before or) while running the batch, or stalled.
            InvalidInput: the pipeline refused the inputs.
            WorkerError: the pipeline failed.
        """
        if self.dead:
            raise WorkerCrashed(f"the worker of model {self.model_id!r} is gone", retry_after_s=1.0)
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
                    await self._send(m.Infer(bid, wire, params, list(trace_ids)))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                if self._slots.pop(bid, None) is not None:
                    for name in large:
                        self._pool.release(name)
                raise WorkerCrashed(f"the worker of model {self.model_id!r} is gone", retry_after_s=1.0) from exc
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
