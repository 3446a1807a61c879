"""Worker processes and model-version lifecycle (supervisor side)."""

from .handle import EventSink, InputList, Output, Outputs, TensorData, WorkerError, WorkerHandle, WorkerSpec
from .launch import Launcher, SpawnLauncher, WorkerProcess, ZygoteLauncher, worker_environment
from .states import TRANSITIONS, IllegalTransition, ModelState, check_transition

__all__ = (
    "TRANSITIONS",
    "EventSink",
    "IllegalTransition",
    "InputList",
    "Launcher",
    "ModelState",
    "Output",
    "Outputs",
    "SpawnLauncher",
    "TensorData",
    "WorkerError",
    "WorkerHandle",
    "WorkerProcess",
    "WorkerSpec",
    "ZygoteLauncher",
    "check_transition",
    "worker_environment",
)
