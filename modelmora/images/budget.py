"""A server-wide budget of decoded image pixels, shared by every request.

A 49 KB PNG can decode to 48 MiB: the encoded size says nothing of the memory a request takes in
the supervisor. Each request takes a lease on the pixels of all its images before decoding them and
gives it back when it is answered; a request waits for room within its deadline, in arrival order.
Strictly first come, first served: a large request at the head of the queue is not overtaken by
smaller ones behind it (they would starve it), and one that can never fit is refused at once.

Backend-neutral (asyncio and trio). Deadlines are on AnyIO's clock (`anyio.current_time()`). A lease
is released from the event loop's thread (synchronously: `release()` or a `with` block).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from anyio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled

from modelmora.errors import ImageBudgetExhausted, PayloadTooLarge

if TYPE_CHECKING:
    from modelmora.config import Settings

__all__ = ("PixelBudget", "PixelBudgetStatistics", "PixelLease")

SETTING = "max_decoded_pixels_in_flight"


@dataclass(frozen=True, slots=True)
class PixelBudgetStatistics:
    """A snapshot of a `PixelBudget`."""

    capacity_pixels: int
    in_use_pixels: int
    waiting: int
    """Requests queued for room."""
    waiting_pixels: int


class _Waiter:
    __slots__ = ("event", "granted", "pixels")

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self.event = anyio.Event()
        self.granted = False


class PixelLease:
    """Pixels taken from a `PixelBudget`; `release()` gives them back (once; later calls do nothing)."""

    __slots__ = ("_budget", "pixels")

    def __init__(self, budget: PixelBudget | None, pixels: int) -> None:
        self._budget = budget
        self.pixels = pixels

    @property
    def released(self) -> bool:
        return self._budget is None

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.pixels)

    def __enter__(self) -> PixelLease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"PixelLease(pixels={self.pixels}, released={self.released})"


class PixelBudget:
    """At most `capacity_pixels` decoded pixels held by leases at once, granted first come, first served.

    Args:
        capacity_pixels: the budget (`max_decoded_pixels_in_flight`).
        retry_after_s: the Retry-After given with `ImageBudgetExhausted`.
    """

    def __init__(self, capacity_pixels: int, *, retry_after_s: float = 1.0) -> None:
        if capacity_pixels < 1:
            raise ValueError(f"capacity_pixels must be at least 1, not {capacity_pixels}")
        self._capacity = capacity_pixels
        self._in_use = 0
        self._waiters: deque[_Waiter] = deque()
        self._retry_after_s = retry_after_s

    @classmethod
    def from_settings(cls, settings: Settings) -> PixelBudget:
        return cls(settings.max_decoded_pixels_in_flight)

    @property
    def capacity_pixels(self) -> int:
        return self._capacity

    @property
    def in_use_pixels(self) -> int:
        return self._in_use

    def statistics(self) -> PixelBudgetStatistics:
        return PixelBudgetStatistics(
            capacity_pixels=self._capacity,
            in_use_pixels=self._in_use,
            waiting=len(self._waiters),
            waiting_pixels=sum(w.pixels for w in self._waiters),
        )

    async def acquire(self, pixels: int, deadline: float = math.inf) -> PixelLease:
        """Take `pixels` from the budget, waiting (behind earlier waiters) until `deadline` for room.

        Args:
            pixels: the decoded pixels (width x height, summed over the request's images).
            deadline: on `anyio.current_time()`'s clock; `math.inf`: wait as long as it takes.

        Raises:
            PayloadTooLarge: `pixels` is more than the whole budget (it could never fit).
            ImageBudgetExhausted: no room before the deadline.
        """
        if pixels < 0:
            raise ValueError(f"pixels must not be negative, not {pixels}")
        if pixels > self._capacity:
            raise PayloadTooLarge(
                f"the images of this request are {pixels} pixels, over the server's whole image budget"
                f" ({SETTING} = {self._capacity})"
            )
        await checkpoint_if_cancelled()
        if not self._waiters and self._in_use + pixels <= self._capacity:
            self._in_use += pixels
            await cancel_shielded_checkpoint()
            return PixelLease(self, pixels)
        waiter = _Waiter(pixels)
        self._waiters.append(waiter)
        try:
            with anyio.CancelScope(deadline=deadline):
                await waiter.event.wait()
        except BaseException:
            self._leave(waiter)  # cancelled from outside: nothing is kept
            raise
        if waiter.granted:
            return PixelLease(self, pixels)
        self._leave(waiter)
        raise ImageBudgetExhausted(
            f"no room for this request's {pixels} decoded image pixels before its deadline"
            f" (other requests hold them; {SETTING} = {self._capacity})",
            retry_after_s=self._retry_after_s,
        )

    def _leave(self, waiter: _Waiter) -> None:
        """`waiter` gives up: out of the queue, or its pixels back if they were granted meanwhile."""
        if waiter.granted:
            self._give_back(waiter.pixels)
            return
        self._waiters.remove(waiter)
        self._grant()  # it may have been the head that held the others back

    def _give_back(self, pixels: int) -> None:
        self._in_use -= pixels
        self._grant()

    def _grant(self) -> None:
        """Grant waiters from the head of the queue while the head fits."""
        while self._waiters and self._in_use + self._waiters[0].pixels <= self._capacity:
            waiter = self._waiters.popleft()
            self._in_use += waiter.pixels
            waiter.granted = True
            waiter.event.set()
