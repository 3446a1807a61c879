"""Worker processes and model-version lifecycle (supervisor side)."""

from .handle import Outputs, TensorData, WorkerError, WorkerHandle, WorkerSpec
from .launch import Launcher, SpawnLauncher, WorkerProcess, ZygoteLauncher, worker_environment
from .states import ModelState

__all__ = (
    "Launcher",
    "ModelState",
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
