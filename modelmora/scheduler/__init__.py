"""Request queues, batching and dispatch to workers."""

from .dispatcher import PIPELINES, ModelRuntime, Scheduler
from .queues import ModelQueue
from .request import ModelKey, Priority, Request

__all__ = ("PIPELINES", "ModelKey", "ModelQueue", "ModelRuntime", "Priority", "Request", "Scheduler")
