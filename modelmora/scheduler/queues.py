"""Per-model bounded queue: priority class, then earliest deadline, with ageing.

Order: the lowest (aged) priority class first; within a class the earliest deadline, then
arrival. Ageing: a waiting request moves up one class every `aging_s` (CRITICAL is the
top), so LOW work is never starved forever.

Data structures: one heap per current class, keyed by (deadline, seq), with lazy deletion
(an entry is stale when its request moved to another class or left the queue); and one
FIFO per original class, in arrival order, which finds the requests due for promotion:
within one original class everyone ages at the same rate, so the requests that reached
level k form a prefix of that FIFO. Each request is promoted at most three times, so
put/take stay O(log n) amortised.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable

import structlog

from ..broadcast import Broadcast
from ..clock import event_loop_clock
from ..errors import DeadlineExceeded, ModelMoraError, QueueFull
from .request import Priority, Request

__all__ = ("ModelQueue",)

_CLASSES = tuple(int(p) for p in Priority)

log = structlog.get_logger("modelmora.scheduler")

SATURATED = 0.8
"""A queue this full (share of its limit) is saturated: a warning is logged..."""
DRAINED = 0.5
"""...and again only after it went back below this share,"""
SATURATED_LOG_S = 10.0
"""...and at most once in this many seconds."""


class ModelQueue:
    """Bounded priority queue of one model's requests.

    Args:
        limit: most requests waiting; `put_nowait` refuses beyond it.
        clock: the time source for deadlines and ageing (the event loop's clock by default,
            as `anyio.current_time` reads it).
        aging_s: seconds after which a waiting request moves up one class (0: never).
    """

    def __init__(self, limit: int, clock: Callable[[], float] | None = None, aging_s: float = 0.0) -> None:
        self.limit = limit
        self.aging_s = aging_s
        self.clock = clock or event_loop_clock()
        """The time source (one cheap callable; the scheduler's other decisions read it too)."""
        self._heaps: dict[int, list[tuple[float, int, Request]]] = {c: [] for c in _CLASSES}
        self._arrivals: dict[int, deque[Request]] = {c: deque() for c in _CLASSES[1:]}
        self._base: dict[int, int] = dict.fromkeys(_CLASSES[1:], 0)
        self._aged: dict[int, list[int]] = {c: [0] * (c - 1) for c in _CLASSES[1:]}
        self._count = 0
        self._items = 0
        self._changed = Broadcast()
        self.by_priority = [0] * (len(_CLASSES) + 1)
        """Requests waiting, by the priority they arrived with (index: `Priority` value)."""
        self.saturated = False
        """At least `SATURATED` of the limit is waiting (until it drains below `DRAINED`)."""
        self._saturated_logged = -math.inf

    def __len__(self) -> int:
        """Requests waiting (cancelled ones leave at once through `discard`)."""
        return self._count

    @property
    def items(self) -> int:
        """Items (texts, images) waiting."""
        return self._items

    def _notify(self) -> None:
        self._changed.notify()

    async def wait_change(self) -> None:
        """Return at the next put, or `interrupt()`."""
        await self._changed.wait()

    def interrupt(self) -> None:
        """Wake every `wait_*` caller (they re-check their condition)."""
        self._notify()

    def put_nowait(self, req: Request) -> None:
        """Queue `req`.

        Raises:
            QueueFull: `limit` requests are already waiting.
        """
        if self._count >= self.limit:
            raise QueueFull(
                f"the queue of model {req.key.model_id!r} is full ({self.limit} requests waiting)",
                retry_after_s=1.0,
            )
        req.enqueued_at = time.perf_counter()
        req.queued_at = self.clock()
        req.cls = int(req.priority)
        heapq.heappush(self._heaps[req.cls], (req.deadline, req.seq, req))
        if req.cls > 1:
            self._arrivals[req.cls].append(req)
        self._count += 1
        self._items += req.size
        self.by_priority[req.priority] += 1
        if self._count >= SATURATED * self.limit and not self.saturated:
            self._saturate(req)
        self._notify()

    def discard(self, req: Request) -> None:
        """Forget a waiting request (its caller went away); its heap entry goes stale."""
        if req.cls != 0:
            self._leave(req)

    def _leave(self, req: Request) -> None:
        req.cls = 0
        self._count -= 1
        self._items -= req.size
        self.by_priority[req.priority] -= 1
        if self.saturated and self._count < DRAINED * self.limit:
            self.saturated = False

    def _saturate(self, req: Request) -> None:
        self.saturated = True
        if req.queued_at - self._saturated_logged >= SATURATED_LOG_S:
            self._saturated_logged = req.queued_at
            log.warning("queue_saturated", model=str(req.key), waiting=self._count, limit=self.limit)

    async def wait_nonempty(self) -> None:
        """Return once a request is waiting."""
        while not self._count:
            await self.wait_change()

    async def wait_fuller(self, items: int) -> None:
        """Return once `items` items, or a CRITICAL request, are waiting."""
        while self._items < items and not self._heaps[1]:
            await self.wait_change()

    def _age(self, now: float) -> None:
        for c, fifo in self._arrivals.items():
            base = self._base[c]
            aged = self._aged[c]
            for k in range(1, c):  # level k: moved up k classes
                threshold = now - k * self.aging_s
                i = max(aged[k - 1], base)
                while i - base < len(fifo) and fifo[i - base].queued_at <= threshold:
                    req = fifo[i - base]
                    if req.cls > c - k:
                        req.cls = c - k
                        heapq.heappush(self._heaps[c - k], (req.deadline, req.seq, req))
                    i += 1
                aged[k - 1] = i
            while fifo and (fifo[0].cls == 0 or base < aged[c - 2]):
                fifo.popleft()  # left the queue, or reached the top class: nothing more to do
                base += 1
            self._base[c] = base

    def _pop(self, cls: int, now: float) -> Request | None:
        """Pop the best live request of class `cls`, failing the expired ones on the way."""
        heap = self._heaps[cls]
        while heap:
            req = heap[0][2]
            if req.cls != cls:
                heapq.heappop(heap)  # stale: moved up, or left the queue
                continue
            heapq.heappop(heap)
            self._leave(req)
            if req.cancelled or req.done.is_set():
                continue
            if req.deadline <= now:
                req.set_error(DeadlineExceeded(f"request for model {req.key.model_id!r} expired while queued"))
                continue
            return req
        return None

    def _pop_best(self, now: float) -> Request | None:
        for cls in _CLASSES:
            if self._heaps[cls]:
                req = self._pop(cls, now)
                if req is not None:
                    return req
        return None

    def _push_back(self, req: Request, cls: int) -> None:
        req.cls = cls
        self._count += 1
        self._items += req.size
        self.by_priority[req.priority] += 1
        heapq.heappush(self._heaps[cls], (req.deadline, req.seq, req))

    def take_batch(self, max_items: int) -> list[Request]:
        """Take the best live request and compatible followers, up to `max_items` items.

        Requests share a batch only when their parameters are equal. A request larger than
        `max_items` goes alone (the worker splits it into passes).
        """
        now = self.clock()
        if self.aging_s > 0:
            self._age(now)
        first = self._pop_best(now)
        if first is None:
            return []
        batch, items = [first], first.size
        skipped: list[tuple[Request, int]] = []
        for cls in _CLASSES:
            while items < max_items and len(skipped) <= 64 and self._heaps[cls]:
                req = self._pop(cls, now)
                if req is None:
                    break
                if req.params != first.params or items + req.size > max_items:
                    skipped.append((req, cls))
                    continue
                batch.append(req)
                items += req.size
        for req, cls in skipped:
            self._push_back(req, cls)
        return batch

    def fail_all(self, error: ModelMoraError) -> None:
        """Fail every waiting request (model unloaded, failed, or shutting down)."""
        now = self.clock()
        for cls in _CLASSES:
            while (req := self._pop(cls, now)) is not None:
                req.set_error(error)
