"""What `/api/v1/status` and `/health/models` report, as typed Structs (they have a schema)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import msgspec
import psutil

from ..config import ModelSettings
from ..images import PixelBudgetStatistics
from ..ipc import segments
from ..registry import ModelRecord
from ..scheduler import BudgetStatus, ModelStatus

__all__ = (
    "HealthModel",
    "HealthModels",
    "ServerStatus",
    "SharedMemoryStatus",
    "SupervisorStatus",
    "registered_status",
    "shared_memory_status",
    "supervisor_status",
)


class SupervisorStatus(msgspec.Struct):
    pid: int
    rss_mb: float
    uptime_s: float
    torch_imported: bool


class SharedMemoryStatus(msgspec.Struct):
    """/dev/shm: its size and free bytes, and what the workers' rings and payload pools hold."""

    total_bytes: int | None
    free_bytes: int | None
    workers_bytes: int


class ServerStatus(msgspec.Struct):
    supervisor: SupervisorStatus
    zygote: Any
    """The zygote's state, pid, memory and counters; null when workers are spawned."""
    budget: BudgetStatus
    images: PixelBudgetStatistics
    """Decoded image pixels of the requests in flight (`max_decoded_pixels_in_flight`)."""
    shared_memory: SharedMemoryStatus
    models: list[ModelStatus]
    """Every registered model's active version, and every other version that ran since start."""


class HealthModel(msgspec.Struct):
    model_id: str
    version: str
    healthy: bool
    state: str
    reason: str | None = None


class HealthModels(msgspec.Struct):
    models: list[HealthModel]


def shared_memory_status(models: list[ModelStatus]) -> SharedMemoryStatus:
    room = segments.shm_room()
    held = sum(m.worker.ring_bytes + m.worker.pool_bytes for m in models if m.worker is not None)
    return SharedMemoryStatus(room.total if room else None, room.free if room else None, held)


def supervisor_status(started: float) -> SupervisorStatus:
    return SupervisorStatus(
        os.getpid(),
        round(psutil.Process().memory_info().rss / 2**20, 1),
        round(time.time() - started, 1),
        "torch" in sys.modules,
    )


def registered_status(rec: ModelRecord, version: str) -> ModelStatus:
    """The status of a registered model version that has not run since start."""
    return ModelStatus(
        model_id=rec.id,
        version=version,
        task_type=rec.task,
        state="cached",
        pinned=bool(msgspec.convert(rec.settings, ModelSettings).pinned),
        queue_depth=0,
        queued_items=0,
        busy=False,
        waiting_for_memory=False,
        reserved_mb=None,
        measured_mb=None,
        device=None,
        vram_reserved_mb=None,
        vram_mb=None,
        last_used=None,
        last_error=None,
        failures=0,
        retry_in_s=None,
        loads=0,
        crashes=0,
        evictions=0,
        served=0,
        batches=0,
        cancelled=0,
        history=[],
    )
