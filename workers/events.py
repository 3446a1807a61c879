"""Events a pipeline emits while a batch runs: generated tokens, diffusion progress.

The worker installs a sink for the batch a thread runs (`sink(fn)`, per thread); a pipeline calls
`emit(kind, data, item=i)` from its inference loop, e.g. `emit("token", {"text": " the"}, item=2)`
for the third input of the batch, or `emit("progress", {"step": 3, "steps": 20})` (item -1:
every input of the batch). Outside a batch, or in a test that installed no sink, `emit`
does nothing. Events are small (control socket messages), never bulk data.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ("Sink", "emit", "sink")

Sink = Callable[[int, str, dict[str, Any]], None]
"""Called with (item index or -1, event kind, JSON-able data)."""

_local = threading.local()


def emit(kind: str, data: dict[str, Any], item: int = -1) -> None:
    """Report an event of this thread's batch to the supervisor (no-op without a sink)."""
    fn: Sink | None = getattr(_local, "sink", None)
    if fn is not None:
        fn(item, kind, data)


@contextmanager
def sink(fn: Sink | None) -> Iterator[None]:
    """Route this thread's `emit` calls to `fn` while the block runs (the worker wraps each batch)."""
    previous = getattr(_local, "sink", None)
    _local.sink = fn
    try:
        yield
    finally:
        _local.sink = previous
