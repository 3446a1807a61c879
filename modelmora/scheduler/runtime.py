"""What the supervisor knows about one model version at run time: its `ModelRuntime`."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import anyio
import structlog

from ..broadcast import Broadcast
from ..config import ModelSettings
from ..lifecycle import ModelState, WorkerHandle, check_transition
from ..observability import ModelMetrics
from ..registry import ModelRecord
from .queues import ModelQueue
from .request import ModelKey, Request

__all__ = ("ModelIdentity", "ModelRuntime", "RunningBatch", "StopReason")

log = structlog.get_logger("modelmora.scheduler")


class StopReason(enum.StrEnum):
    """Why a model's worker should stop."""

    EVICT = "evict"
    """Make room for another model: running batches finish, queued requests wait for its return."""
    REPLACE = "replace"
    """The registry entry, files or device settings changed: like EVICT, the next worker loads the new ones."""
    UNLOAD = "unload"
    """Explicit unload: drain the queue first, then stop."""
    UNLOAD_NOW = "unload-now"
    """The drain time is over: stop once running batches finish."""
    IDLE = "idle"
    """Idle for its keep_alive."""
    STALLED = "stalled"
    """The worker answered nothing within worker_stall_s."""

    @property
    def drains(self) -> bool:
        """Queued requests are served before the worker stops."""
        return self is StopReason.UNLOAD


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """What a worker was started from: when any of it changes, a running worker is stale."""

    task: str
    pipeline: str
    path: str
    files: tuple[tuple[str, str], ...]
    """(relative path, SHA-256) of every file, sorted."""
    created_at: float
    device: str
    dtype: str


@dataclass(eq=False)
class RunningBatch:
    """A batch in the worker."""

    requests: list[Request]
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    """Cancelled when every request of the batch was withdrawn: the worker is told to stop it."""


@dataclass(eq=False)
class ModelRuntime:
    """Everything the supervisor knows about one model version at run time.

    Created by `Scheduler.runtime_for` only; one per model version.
    """

    key: ModelKey
    identity: ModelIdentity
    queue: ModelQueue
    model_settings: ModelSettings
    weights_bytes: int = 0
    state: ModelState = ModelState.CACHED
    worker: WorkerHandle | None = None
    record: ModelRecord | None = None
    """The registry record the runtime was last brought up to date with."""
    worker_identity: ModelIdentity | None = None
    """The identity the running worker was started from."""
    running: list[RunningBatch] = field(default_factory=list)
    """The batches in the worker: one, or up to its inference streams."""
    stop_reason: StopReason | None = None
    load_requested: bool = False
    waiting_for_memory: bool = False
    removed: bool = False
    """Uninstalled: its task ends once the worker is gone."""
    failures: int = 0
    retry_at: float | None = None
    """Clock time of the next background retry of a failed load."""
    last_used: float = 0.0
    """Clock time of the last request or batch."""
    last_error: str | None = None
    measured_mb: float | None = None
    measured_vram_mb: float | None = None
    hint_mb: float | None = None
    """The registry's resource hint for a worker's memory (MiB), used until one is measured."""
    hint_vram_mb: float | None = None
    device: str | None = None
    """The device its worker ran on last ("cpu", "cuda", "cuda:1"...), once known."""
    loads: int = 0
    crashes: int = 0
    crash_streak: int = 0
    """Crashes since the last batch that succeeded: restarts back off once it reaches 2."""
    evictions: int = 0
    served: int = 0
    batches: int = 0
    cancelled: int = 0
    history: list[tuple[float, str, str]] = field(default_factory=list)
    changed: Broadcast = field(default_factory=Broadcast)
    """Notified on every state change and control request."""
    any_changed: Broadcast = field(default_factory=Broadcast)
    """Shared by all runtimes of a scheduler, notified with `changed`: loads waiting for memory
    look again when any model's state changes (a victim may have become evictable)."""
    metrics: ModelMetrics | None = None
    """The model's metric children, bound once (set by the scheduler)."""

    def set_state(self, state: ModelState, reason: str = "") -> None:
        """Move to `state` (one of the transitions `lifecycle.states` allows) and wake waiters."""
        if state != self.state:
            check_transition(self.state, state)
            level = log.error if state == ModelState.FAILED else log.info
            level("model_state", model=str(self.key), state=str(state), previous=str(self.state), reason=reason)
            self.state = state
            self.history.append((time.time(), str(state), reason))
            del self.history[:-50]
        self.poke()

    def stop(self, reason: StopReason) -> None:
        """Ask the worker to stop (a reason already set that drains less wins)."""
        if self.stop_reason is None or self.stop_reason is StopReason.UNLOAD:
            self.stop_reason = reason
        self.poke()

    def poke(self) -> None:
        """Wake whoever waits on this model (its task, load/unload callers)."""
        self.changed.notify()
        self.any_changed.notify()
        self.queue.interrupt()

    @property
    def busy(self) -> bool:
        """A batch is running in the worker (it pins the model)."""
        return bool(self.running)

    @property
    def in_use(self) -> bool:
        """A worker runs or is starting, or requests wait for it."""
        return self.loaded or self.state in (ModelState.LOADING, ModelState.WARMING) or bool(len(self.queue))

    @property
    def pinned(self) -> bool:
        return bool(self.model_settings.pinned)

    @property
    def loaded(self) -> bool:
        return self.worker is not None and not self.worker.dead

    @property
    def stale(self) -> bool:
        """Its worker was started from another registry entry, other files or other device settings."""
        return self.worker_identity is not None and self.worker_identity != self.identity
