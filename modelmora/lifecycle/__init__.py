"""Worker processes and model-version lifecycle (supervisor side)."""

from ..errors import WorkerError
from ..ipc.payloads import InputList, Output, Outputs, TensorData
from .channel import EventSink, WorkerChannel
from .handle import (
    DEFAULT_STALL_S,
    PhaseSink,
    WorkerHandle,
    WorkerSpec,
    WorkerStatistics,
    heartbeat_interval,
)
from .launchers import Launcher, SpawnLauncher, WorkerProcess, worker_environment
from .states import TRANSITIONS, IllegalTransition, ModelState, check_transition
from .zygote import ZygoteLauncher, ZygoteUnavailable

__all__ = (
    "DEFAULT_STALL_S",
    "TRANSITIONS",
    "EventSink",
    "IllegalTransition",
    "InputList",
    "Launcher",
    "ModelState",
    "Output",
    "Outputs",
    "PhaseSink",
    "SpawnLauncher",
    "TensorData",
    "WorkerChannel",
    "WorkerError",
    "WorkerHandle",
    "WorkerProcess",
    "WorkerSpec",
    "WorkerStatistics",
    "ZygoteLauncher",
    "ZygoteUnavailable",
    "check_transition",
    "heartbeat_interval",
    "worker_environment",
)
