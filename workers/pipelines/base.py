"""The Pipeline protocol every task implementation follows, and the errors it may raise."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

__all__ = ("InputError", "Pipeline")


class InputError(Exception):
    """The request's inputs are wrong for this model (reported to the client as 422).

    Args:
        message: what is wrong, for the client.
        field: JSON path of the faulty field relative to the request, e.g. "$.input_data.text[2]".
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Pipeline(Protocol):
    """Loads one model and runs batches. Constructed once per worker process.

    `inputs` holds a list of str for text fields, and numpy arrays (views over shared
    memory, valid only during the call) for tensor fields. Outputs are numpy arrays.
    """

    device: str

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None: ...

    def warmup(self) -> None:
        """Run a test inference; raise if the model does not work."""

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run one batch."""
        ...
