"""Worker processes and model-version lifecycle (supervisor side)."""

from .handle import EventSink, InputList, Output, Outputs, TensorData, WorkerError, WorkerHandle, WorkerSpec
from .launch import Launcher, SpawnLauncher, WorkerProcess, ZygoteLauncher, worker_environment
from .states import ModelState

__all__ = (
    "EventSink",
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
    "worker_environment",
)
