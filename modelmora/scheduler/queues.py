"""Per-model bounded queue: priority class, then earliest deadline, then arrival."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

import anyio

from ..errors import DeadlineExceeded, ModelMoraError, QueueFull
from .request import Request

__all__ = ("ModelQueue",)


class ModelQueue:
    """Bounded priority queue of one model's requests.

    Args:
        limit: most requests waiting; `put_nowait` refuses beyond it.
        clock: the time source (anyio's clock by default; tests may inject one).
    """

    def __init__(self, limit: int, clock: Callable[[], float] = anyio.current_time) -> None:
        self.limit = limit
        self._heap: list[tuple[int, float, int, Request]] = []
        self._clock = clock
        self._nonempty = anyio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def put_nowait(self, req: Request) -> None:
        """Queue `req`.

        Raises:
            QueueFull: `limit` requests are already waiting.
        """
        if len(self._heap) >= self.limit:
            raise QueueFull(
                f"the queue of model {req.key.model_id!r} is full ({self.limit} requests waiting)",
                retry_after_s=1.0,
            )
        req.enqueued_at = time.perf_counter()
        heapq.heappush(self._heap, (int(req.priority), req.deadline, req.seq, req))
        self._nonempty.set()

    async def wait_nonempty(self) -> None:
        while not self._heap:
            self._nonempty = anyio.Event()
            await self._nonempty.wait()

    def _pop_live(self) -> Request | None:
        now = self._clock()
        while self._heap:
            req = heapq.heappop(self._heap)[3]
            if req.cancelled or req.done.is_set():
                continue
            if req.deadline <= now:
                req.set_error(DeadlineExceeded(f"request for model {req.key.model_id!r} expired while queued"))
                continue
            return req
        return None

    def take_batch(self, max_items: int) -> list[Request]:
        """Take the best live request and compatible followers, up to `max_items` items.

        Requests share a batch only when their parameters are equal. A request larger than
        `max_items` goes alone (the worker splits it into passes).
        """
        first = self._pop_live()
        if first is None:
            return []
        batch, items, skipped = [first], first.size, []
        while self._heap and items < max_items:
            req = self._pop_live()
            if req is None:
                break
            if req.params != first.params or items + req.size > max_items:
                skipped.append(req)
                if len(skipped) > 64:
                    break
                continue
            batch.append(req)
            items += req.size
        for req in skipped:
            heapq.heappush(self._heap, (int(req.priority), req.deadline, req.seq, req))
        return batch

    def fail_all(self, error: ModelMoraError) -> None:
        while self._heap:
            heapq.heappop(self._heap)[3].set_error(error)
