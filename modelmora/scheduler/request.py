"""One unit of work: what a request asks for, its priority, deadline and result slot."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..errors import ModelMoraError

__all__ = ("ModelKey", "Priority", "Request")

_seq = itertools.count()


class Priority(enum.IntEnum):
    """Priority classes: lower value is served first."""

    CRITICAL = 1
    HIGH = 2
    NORMAL = 3
    LOW = 4

    @classmethod
    def parse(cls, value: int | str) -> Priority:
        """Accept 1..4 or a name (`medium` is NORMAL)."""
        if isinstance(value, str):
            name = value.strip().upper()
            return cls.NORMAL if name == "MEDIUM" else cls[name]
        return cls(value)


@dataclass(frozen=True, slots=True)
class ModelKey:
    """A model version."""

    model_id: str
    version: str

    def __str__(self) -> str:
        return f"{self.model_id}@{self.version}"


@dataclass(eq=False, slots=True)
class Request:
    """A queued inference request; the dispatcher fills `result` or `error`."""

    key: ModelKey
    inputs: dict[str, list[Any]]
    """Input lists by field ("text": [str], "image": [TensorData]); all of one length, the item count."""
    params: dict[str, Any]
    priority: Priority
    deadline: float
    """anyio clock time after which the request is dropped."""
    enqueued_at: float = 0.0
    """Timing stamps (enqueued/dispatched/finished) are `time.perf_counter()` values."""
    dispatched_at: float = 0.0
    finished_at: float = 0.0
    seq: int = field(default_factory=lambda: next(_seq))
    queued_at: float = 0.0
    """Queue clock time of enqueueing (ageing counts from it)."""
    cls: int = 0
    """Current (aged) priority class while queued; 0 once it left the queue."""
    on_event: Callable[[int, str, dict[str, Any]], None] | None = None
    """Receives the request's events while its batch runs: (item index in this request or -1, kind, data)."""
    result: Any = None
    """Outputs by name, each with one entry (or array row) per input item."""
    error: ModelMoraError | None = None
    cancelled: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    on_done: Callable[[], None] | None = None
    """Called once when the request is done (result or error): its caller may wait on something
    else meanwhile (e.g. for the client to disconnect) without a task of its own."""
    size: int = field(init=False)
    """Number of input items (texts, images)."""
    trace_id: str = ""
    """The W3C trace id of the request (32 hex digits; "" when none): its batch takes it to the worker."""
    cold: bool = False
    """It arrived while its model was not loaded (a cold start: it waits for the load)."""

    def __post_init__(self) -> None:
        self.size = len(next(iter(self.inputs.values()))) if self.inputs else 0

    def set_result(self, value: Any) -> None:
        if not self.done.is_set():
            self.result = value
            self._finish()

    def set_error(self, error: ModelMoraError) -> None:
        if not self.done.is_set():
            self.error = error
            self._finish()

    def _finish(self) -> None:
        self.finished_at = time.perf_counter()
        self.done.set()
        if self.on_done is not None:
            self.on_done()

    @property
    def waiting(self) -> bool:
        """Still in its queue and wanted."""
        return self.cls != 0 and not self.cancelled and not self.done.is_set()

    def cancel(self) -> None:
        """The caller gave up (deadline or disconnect): skip it, drop its result."""
        self.cancelled = True
