"""The runtime status of a model version, as `/api/v1/status` reports it."""

from __future__ import annotations

import msgspec

from ..lifecycle import WorkerStatistics
from .admission import Admission
from .runtime import ModelRuntime

__all__ = ("ModelStatus", "StateChange", "model_status")


class StateChange(msgspec.Struct):
    at: float
    """Unix time."""
    state: str
    reason: str


class ModelStatus(msgspec.Struct, omit_defaults=True):
    """One model version at run time. `worker` is present while a worker runs."""

    model_id: str
    version: str
    task_type: str
    state: str
    pinned: bool
    queue_depth: int
    queued_items: int
    busy: bool
    waiting_for_memory: bool
    reserved_mb: float | None
    measured_mb: float | None
    device: str | None
    vram_reserved_mb: float | None
    vram_mb: float | None
    last_used: float | None
    """Unix time of the last request or batch."""
    last_error: str | None
    failures: int
    retry_in_s: float | None
    loads: int
    crashes: int
    evictions: int
    served: int
    batches: int
    cancelled: int
    history: list[StateChange]
    worker: WorkerStatistics | None = None
    """The worker's statistics (pid, in-flight batches, streams, memory, start times...)."""


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def model_status(rt: ModelRuntime, admission: Admission, now: float, wall: float) -> ModelStatus:
    """`rt`'s status; `now` is the scheduler's clock and `wall` the unix time at the same moment."""
    return ModelStatus(
        model_id=rt.key.model_id,
        version=rt.key.version,
        task_type=rt.identity.task,
        state=str(rt.state),
        pinned=rt.pinned,
        queue_depth=len(rt.queue),
        queued_items=rt.queue.items,
        busy=rt.busy,
        waiting_for_memory=rt.waiting_for_memory,
        reserved_mb=_round(admission.budget.reserved_mb(rt)),
        measured_mb=_round(rt.measured_mb),
        device=rt.device,
        vram_reserved_mb=_round(admission.vram.reserved_mb(rt)),
        vram_mb=_round(rt.measured_vram_mb),
        last_used=wall - (now - rt.last_used) if rt.last_used else None,
        last_error=rt.last_error,
        failures=rt.failures,
        retry_in_s=None if rt.retry_at is None else round(max(0.0, rt.retry_at - now), 1),
        loads=rt.loads,
        crashes=rt.crashes,
        evictions=rt.evictions,
        served=rt.served,
        batches=rt.batches,
        cancelled=rt.cancelled,
        history=[StateChange(at, st, why) for at, st, why in rt.history[-10:]],
        worker=rt.worker.statistics() if rt.worker is not None else None,
    )
