"""Request queues, batching and dispatch to workers, within the memory budget."""

from .admission import Admission, BudgetStatus
from .batching import BatchWorker
from .queues import ModelQueue
from .request import ModelKey, Priority, Request
from .runtime import ModelIdentity, ModelRuntime, RunningBatch, StopReason
from .scheduler import Scheduler
from .status import ModelStatus, StateChange
from .supervision import ModelSupervisor, WorkerOpener

__all__ = (
    "Admission",
    "BatchWorker",
    "BudgetStatus",
    "ModelIdentity",
    "ModelKey",
    "ModelQueue",
    "ModelRuntime",
    "ModelStatus",
    "ModelSupervisor",
    "Priority",
    "Request",
    "RunningBatch",
    "Scheduler",
    "StateChange",
    "StopReason",
    "WorkerOpener",
)
