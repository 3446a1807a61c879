"""What the supervisor sends a pipeline as `params`: built from the API's parameter Structs.

The pipelines keep no defaults of their own (they read what they are given), so a test that
calls one directly passes what the supervisor would: the task's parameter Struct with the
test's values, converted as the inference core converts it, plus "batch_size".
"""

from __future__ import annotations

from typing import Any

from modelmora.service import ADAPTERS
from modelmora.tasks import TaskType

__all__ = ("worker_params",)


def worker_params(task: str, *, batch_size: int = 8, stream: bool = False, **values: Any) -> dict[str, Any]:
    """The parameters of one batch of `task` ("txt2txt"...): the defaults of its parameter
    Struct with `values` set, `stream` where the task streams, and `batch_size`."""
    adapter = ADAPTERS[TaskType(task)]
    params = adapter.worker_params(adapter.params_type(**values), stream)
    params["batch_size"] = batch_size
    return params
