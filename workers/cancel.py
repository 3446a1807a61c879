"""Per-batch cancel flags that long pipelines check between steps.

The worker's control reader thread calls `request(batch_id)` when the supervisor sends
`Cancel`; an inference thread marks the batch it runs with `running(batch_id)` (a worker with
several streams runs several batches at once, one per thread), and a pipeline calls `check()`
between steps (diffusion steps, generated tokens) to stop early.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ("Cancelled", "check", "is_cancelled", "request", "running")


class Cancelled(Exception):
    """Raised by `check()` inside a pipeline whose batch was cancelled."""


_KEEP = 1000
"""A request for a batch this many ids older than one that finished is dropped: that batch has
finished too (or will never come), so the set of requests stays small."""

_lock = threading.Lock()
_requested: set[int] = set()
_local = threading.local()


def request(batch_id: int) -> None:
    """Flag `batch_id` as cancelled (from the control reader thread), running or not started yet."""
    with _lock:
        _requested.add(batch_id)


@contextmanager
def running(batch_id: int) -> Iterator[None]:
    """Mark `batch_id` as the batch this thread runs now."""
    _local.current = batch_id
    try:
        yield
    finally:
        _local.current = None
        with _lock:
            _requested.discard(batch_id)
            for stale in [b for b in _requested if b < batch_id - _KEEP]:
                _requested.discard(stale)


def is_cancelled() -> bool:
    """Whether the batch this thread runs was cancelled."""
    current = getattr(_local, "current", None)
    with _lock:
        return current is not None and current in _requested


def check() -> None:
    """Raise `Cancelled` if the batch this thread runs was cancelled."""
    if is_cancelled():
        raise Cancelled
