"""A fake worker for scheduler policy tests: no process, no shared memory.

`FakeWorkers.open` is what `Scheduler(open_worker=...)` takes. Each worker it yields has what
batching (`scheduler.BatchWorker`) and supervision read of a worker. Its batches wait until the
test answers them (`FakeBatch.answer` / `fail`), unless the workers answer on their own; a worker
can crash (its `read_loop` returns, `crashed` is set) and records the batches it saw, in order,
with their items and parameters, and whether a batch was cancelled under it.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from modelmora.broadcast import Broadcast
from modelmora.errors import ModelLoadFailed, ModelMoraError, WorkerCrashed
from modelmora.lifecycle import EventSink, Outputs, WorkerSpec

__all__ = ("FakeBatch", "FakeLoaded", "FakeWorker", "FakeWorkers")

# far above any pid_max (2**22): /proc has no such process, so its PSS reads as None and the
# budget keeps its estimates
_pids = itertools.count(1_000_000_000)


@dataclass(frozen=True)
class FakeLoaded:
    """What a worker reported at load (only the device is read)."""

    device: str = "cpu"


@dataclass(eq=False)
class FakeBatch:
    """One batch the scheduler sent to a fake worker."""

    worker: FakeWorker
    batch_id: int
    inputs: dict[str, list[Any]]
    params: dict[str, Any]
    started_at: float
    """Clock time at which the scheduler sent it."""
    outputs: Outputs | None = None
    error: ModelMoraError | None = None
    cancelled: bool = False
    """The scheduler cancelled the `infer` call while the batch ran."""
    finished_at: float | None = None
    _answered: anyio.Event = field(default_factory=anyio.Event)

    @property
    def texts(self) -> list[Any]:
        return self.inputs.get("text", [])

    @property
    def running(self) -> bool:
        return self.finished_at is None

    def answer(self, outputs: Outputs | None = None) -> None:
        """Let `infer` return `outputs` (default: each text echoed back as "echo")."""
        self.outputs = {"echo": list(self.texts)} if outputs is None else outputs
        self._answered.set()

    def fail(self, error: ModelMoraError) -> None:
        """Let `infer` raise `error`."""
        self.error = error
        self._answered.set()


class FakeWorker:
    """A worker without a process (`BatchWorker` plus what supervision reads of a worker)."""

    def __init__(self, owner: FakeWorkers, spec: WorkerSpec, *, streams: int = 1, device: str = "cpu") -> None:
        self.owner = owner
        self.spec = spec
        self.pid = next(_pids)
        self.streams = streams
        self.loaded: FakeLoaded | None = FakeLoaded(device)
        self.vram_bytes = 0
        self.dead = False
        self.crashed = False
        self.crash_reason: str | None = None
        self.opened_at = anyio.current_time()
        self.stopped_at: float | None = None
        """Clock time at which the scheduler stopped it (left its context)."""
        self.batches: list[FakeBatch] = []
        self.crash_on_infer = False
        """Crash as soon as a batch arrives."""
        self._next_batch = 0
        self._gone = anyio.Event()

    def new_batch_id(self) -> int:
        self._next_batch += 1
        return self._next_batch

    async def read_loop(self) -> None:
        """Returns once the worker is gone (crashed, or stopped)."""
        await self._gone.wait()

    def statistics(self) -> dict[str, Any]:
        return {"pid": self.pid, "in_flight_batches": sum(b.running for b in self.batches), "streams": self.streams}

    def crash(self, reason: str = "exited") -> None:
        """The process dies: batches in flight fail with WorkerCrashed and `read_loop` returns."""
        if self.dead:
            return
        self.dead = self.crashed = True
        self.crash_reason = reason
        for batch in self.batches:
            if batch.running and not batch._answered.is_set():
                batch.fail(WorkerCrashed("the fake worker exited while running this request", retry_after_s=1.0))
        self._gone.set()

    def stop(self) -> None:
        """The scheduler stopped it (no crash)."""
        if self.stopped_at is None:
            self.stopped_at = anyio.current_time()
        if not self.dead:
            self.dead = True
            self._gone.set()

    async def infer(
        self,
        inputs: dict[str, list[Any]],
        params: dict[str, Any],
        *,
        batch_id: int | None = None,
        on_event: EventSink | None = None,
        trace_ids: Sequence[str] = (),
    ) -> Outputs:
        if self.dead:
            raise WorkerCrashed("the fake worker is gone", retry_after_s=1.0)
        batch = FakeBatch(
            self,
            self.new_batch_id() if batch_id is None else batch_id,
            {name: list(values) for name, values in inputs.items()},
            dict(params),
            anyio.current_time(),
        )
        self.batches.append(batch)
        self.owner.batches.append(batch)
        self.owner.changed.notify()
        if self.crash_on_infer:
            self.crash()
        elif self.owner.auto_answer:
            batch.answer()
        try:
            await batch._answered.wait()
        except anyio.get_cancelled_exc_class():
            batch.cancelled = True
            raise
        finally:
            batch.finished_at = anyio.current_time()
            self.owner.changed.notify()
        if batch.error is not None:
            raise batch.error
        assert batch.outputs is not None
        return batch.outputs


class FakeWorkers:
    """Starts fake workers for a scheduler (`open` is its `open_worker`) and records them."""

    def __init__(self, *, auto_answer: bool = False, streams: int = 1) -> None:
        self.auto_answer = auto_answer
        """Batches are answered as they arrive (otherwise the test answers each)."""
        self.streams = streams
        self.workers: list[FakeWorker] = []
        self.batches: list[FakeBatch] = []
        """Every batch of every worker, in the order they were sent."""
        self.load_attempts: list[tuple[str, float]] = []
        """(model id, clock time) of every worker start, failed ones included."""
        self.fail_loads: dict[str, int] = {}
        """Model id -> how many of its next starts fail (ModelLoadFailed)."""
        self.crash_on_infer: set[str] = set()
        """Model ids whose workers crash at their first batch."""
        self.devices: dict[str, str] = {}
        """Model id -> the device its workers report (default cpu)."""
        self.changed = Broadcast()
        """Notified when a worker starts or stops, and when a batch starts or ends."""

    @asynccontextmanager
    async def open(self, spec: WorkerSpec, on_phase: Callable[[str], None]) -> AsyncIterator[FakeWorker]:
        self.load_attempts.append((spec.model_id, anyio.current_time()))
        await anyio.lowlevel.checkpoint()
        if self.fail_loads.get(spec.model_id, 0):
            self.fail_loads[spec.model_id] -= 1
            raise ModelLoadFailed(f"model {spec.model_id!r} failed to load (fake)")
        on_phase("warming")
        worker = FakeWorker(self, spec, streams=self.streams, device=self.devices.get(spec.model_id, "cpu"))
        worker.crash_on_infer = spec.model_id in self.crash_on_infer
        self.workers.append(worker)
        self.changed.notify()
        try:
            yield worker
        finally:
            worker.stop()
            self.changed.notify()

    def of(self, model_id: str) -> list[FakeWorker]:
        """The workers started for `model_id`, oldest first."""
        return [w for w in self.workers if w.spec.model_id == model_id]

    def live(self, model_id: str) -> FakeWorker | None:
        return next((w for w in self.of(model_id) if not w.dead), None)

    async def next_batch(self, model_id: str | None = None) -> FakeBatch:
        """The next batch (of `model_id`) that is still waiting for its answer, once one arrives."""
        while True:
            for batch in self.batches:
                waiting = batch.running and not batch._answered.is_set()
                if waiting and (model_id is None or batch.worker.spec.model_id == model_id):
                    return batch
            await self.changed.wait()
