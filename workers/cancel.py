"""Per-batch cancel flags that long pipelines check between steps.

The worker's control reader thread calls `request(batch_id)` when the supervisor sends
`Cancel`; the inference thread marks the batch it runs with `running(batch_id)`, and a
pipeline calls `check()` between steps (diffusion steps, generated tokens) to stop early.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ("Cancelled", "check", "is_cancelled", "request", "running")


class Cancelled(Exception):
    """Raised by `check()` inside a pipeline whose batch was cancelled."""


_lock = threading.Lock()
_requested: set[int] = set()
_current: int | None = None


def request(batch_id: int) -> None:
    """Flag `batch_id` as cancelled (from the control reader thread)."""
    with _lock:
        if _current is None or batch_id >= _current:  # ignore batches that already finished
            _requested.add(batch_id)


@contextmanager
def running(batch_id: int) -> Iterator[None]:
    """Mark `batch_id` as the batch the inference thread runs now."""
    global _current
    with _lock:
        _current = batch_id
    try:
        yield
    finally:
        with _lock:
            _current = None
            _requested.discard(batch_id)
            for stale in [b for b in _requested if b < batch_id]:
                _requested.discard(stale)


def is_cancelled() -> bool:
    """Whether the running batch was cancelled."""
    with _lock:
        return _current is not None and _current in _requested


def check() -> None:
    """Raise `Cancelled` if the running batch was cancelled."""
    if is_cancelled():
        raise Cancelled
