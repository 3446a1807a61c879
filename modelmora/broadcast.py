"""A broadcast signal: every task waiting on it wakes at the next `notify()`."""

from __future__ import annotations

import anyio

__all__ = ("Broadcast",)


class Broadcast:
    """Wake every current waiter at once; later waiters wait for the next `notify()`.

    The event is created by waiters only, so notifying with nobody waiting costs nothing.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        """Return at the next `notify()`."""
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()
