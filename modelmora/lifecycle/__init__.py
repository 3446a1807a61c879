"""Worker processes and model-version lifecycle (supervisor side)."""

from .handle import Outputs, TensorData, WorkerError, WorkerHandle, WorkerSpec
from .states import ModelState

__all__ = ("ModelState", "Outputs", "TensorData", "WorkerError", "WorkerHandle", "WorkerSpec")
