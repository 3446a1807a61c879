"""The Pipeline protocol every task implementation follows, and the errors it may raise.

Inputs (`run(inputs, params)`), by field name:
- "text": list[str], one per item;
- "image": list of numpy uint8 arrays of shape (height, width, 3), RGB, one per item. They are
  views over shared memory, valid only during the call (copy what you keep).

Outputs, by field name; every output has one entry per input item, in input order:
- a numpy array whose first dimension is the number of items (e.g. "embeddings", float32 (n, d));
- a list[str] (e.g. "texts", "finish_reasons");
- a list[bytes] (e.g. "images": one PNG per item).

Params arrive validated by the supervisor with every parameter of the task present (the
defaults, kept in one place, the API schema, filled in; None for an optional one the client
left out), plus "batch_size" (the model's max_batch_size: run forward passes of at most that
many items). A pipeline reads them with `param`, keeping no default of its own: a missing one
is a protocol error.
While a batch runs, long pipelines call `cancel.check()` between steps (it raises
`cancel.Cancelled`) and may report progress with `events.emit(...)`; one-pass pipelines given more
items than "batch_size" run them in `sub_batches`, which checks between forward passes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from modelmora.ipc.control import ProtocolError

from .. import cancel

__all__ = ("InputError", "Output", "Pipeline", "param", "sub_batches")

Output = np.ndarray | list[str] | list[bytes]


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
    """Loads one model and runs batches. Constructed once per worker process."""

    device: str

    def __init__(self, path: str, *, device: str, dtype: str, options: dict[str, Any]) -> None: ...

    def warmup(self) -> None:
        """Run a test inference; raise if the model does not work."""

    def run(self, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, Output]:
        """Run one batch."""
        ...


def param(params: Mapping[str, Any], name: str) -> Any:
    """The parameter `name` as the supervisor sent it (None: an optional one left out).

    Raises:
        ProtocolError: `params` lacks `name`: the supervisor sends every parameter of the task,
            defaults filled in, plus "batch_size"; a caller that builds them itself must too.
    """
    try:
        return params[name]
    except KeyError:
        raise ProtocolError(
            f"parameter {name!r} missing from the batch's parameters (the supervisor sends every"
            f" parameter of the task with its default filled in; got {', '.join(sorted(params)) or 'none'})"
        ) from None


def sub_batches(count: int, size: int) -> Iterator[slice]:
    """Slices of at most `size` items covering `count` items in order, checking the cancel flag before
    each: a cancelled batch stops within one sub-batch (one forward pass of `size` items).

    Raises:
        cancel.Cancelled: the batch this thread runs was cancelled.
    """
    size = max(1, size)
    for start in range(0, count, size):
        cancel.check()
        yield slice(start, min(start + size, count))
