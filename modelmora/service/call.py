"""One inference call, whatever protocol it came in by, and the core's record of it on its way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..observability import TraceContext
from ..registry import ModelRecord
from ..scheduler import ModelRuntime, Priority, Request
from ..security import ANONYMOUS, Identity
from .tasks import Prepared, ReturnMode, TaskAdapter

__all__ = ("InferCall", "Job")


@dataclass(frozen=True, slots=True)
class InferCall:
    """One inference request, whatever protocol it came in by."""

    model_id: str
    inputs: Any
    """`TextInput` / `ImageInput`, or the decoded JSON of `input_data` (validated by the core)."""
    parameters: Any = None
    """The task's parameters struct, or decoded JSON (None: defaults)."""
    version: str | None = None
    priority: Priority = Priority.NORMAL
    timeout_s: float | None = None
    """None: the task type's default (`[timeout_s]` settings)."""
    stream: bool = False
    return_mode: ReturnMode = "auto"
    protocol: str = "unknown"
    """The front end's name ("rest", "grpc", ...): the `protocol` label of the request's metrics."""
    trace: TraceContext | None = None
    """The caller's trace context (`observability.incoming`); None: the request starts a new trace."""
    identity: Identity = ANONYMOUS
    """Who asked (the edge's gate says; anonymous while authentication is off)."""


@dataclass(eq=False, slots=True)
class Job:
    """A call on its way through the core (the core's and its streams' own)."""

    call: InferCall
    record: ModelRecord
    version: str
    adapter: TaskAdapter
    prepared: Prepared
    runtime: ModelRuntime
    request: Request
    timeout_s: float
    t0: float
    trace: TraceContext
