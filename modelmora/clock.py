"""The event loop's clock as one cheap callable, for the hot path and scheduling decisions.

`anyio.current_time()` looks the backend up on every call (through sniffio): about 0.5 us, several
times per request. `event_loop_clock()` looks it up once and returns what it reads: the running
asyncio loop's `time` (the values AnyIO's deadlines use) or `trio.current_time` (which follows a
`MockClock` in tests).
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

__all__ = ("event_loop_clock",)


def event_loop_clock() -> Callable[[], float]:
    """The running backend's clock (call it from inside the event loop)."""
    import asyncio

    try:
        return asyncio.get_running_loop().time
    except RuntimeError:
        pass
    try:
        import trio

        trio.current_time()  # raises outside trio
    except (ImportError, RuntimeError):
        return anyio.current_time
    return trio.current_time
