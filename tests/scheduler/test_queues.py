"""ModelQueue ordering, limits and expiry, with an injected clock (no event loop needed for the sync parts)."""

from __future__ import annotations

import pytest

from modelmora.errors import DeadlineExceeded, QueueFull
from modelmora.scheduler import ModelKey, ModelQueue, Priority, Request

KEY = ModelKey("m", "1.0.0")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def req(texts: list[str], priority: Priority = Priority.NORMAL, deadline: float = 1e9, **params: object) -> Request:
    return Request(KEY, {"text": texts}, dict(params), priority, deadline)


pytestmark = pytest.mark.anyio


async def test_priority_then_deadline_then_arrival() -> None:
    q = ModelQueue(100, Clock())
    low = req(["low"], Priority.LOW)
    normal_late = req(["nl"], deadline=500)
    normal_early = req(["ne"], deadline=200)
    normal_early2 = req(["ne2"], deadline=200)
    critical = req(["c"], Priority.CRITICAL)
    for r in (low, normal_late, normal_early, normal_early2, critical):
        q.put_nowait(r)
    order = [q.take_batch(1)[0] for _ in range(5)]
    assert order == [critical, normal_early, normal_early2, normal_late, low]
    assert q.take_batch(1) == []


async def test_batches_count_items_and_group_equal_params() -> None:
    q = ModelQueue(100, Clock())
    a = req(["a", "b"], normalize=True)
    b = req(["c"], normalize=False)
    c = req(["d", "e"], normalize=True)
    d = req(["f"] * 10, normalize=True)
    for r in (a, b, c, d):
        q.put_nowait(r)
    assert q.take_batch(4) == [a, c]  # b has other params; d would exceed 4 items
    assert q.take_batch(4) == [b]
    assert q.take_batch(4) == [d]  # larger than the batch: goes alone
    assert len(q) == 0


async def test_queue_full_refuses_at_once_without_touching_the_queue() -> None:
    q = ModelQueue(2, Clock())
    first, second = req(["1"]), req(["2"])
    q.put_nowait(first)
    q.put_nowait(second)
    with pytest.raises(QueueFull) as info:
        q.put_nowait(req(["3"]))
    assert info.value.http_status == 429 and info.value.retry_after_s
    assert len(q) == 2 and q.take_batch(10) == [first, second]


async def test_expired_and_cancelled_requests_never_dispatch() -> None:
    clock = Clock()
    q = ModelQueue(10, clock)
    expired, cancelled, live = req(["x"], deadline=150), req(["y"]), req(["z"])
    for r in (expired, cancelled, live):
        q.put_nowait(r)
    cancelled.cancel()
    clock.now = 151
    assert q.take_batch(10) == [live]
    assert isinstance(expired.error, DeadlineExceeded) and expired.done.is_set()
    assert not cancelled.done.is_set()


async def test_fail_all_and_wait_nonempty() -> None:
    import anyio

    q = ModelQueue(10, Clock())
    r = req(["a"])

    async def put_later() -> None:
        await anyio.sleep(0.01)
        q.put_nowait(r)

    async with anyio.create_task_group() as tg:
        tg.start_soon(put_later)
        with anyio.fail_after(5):
            await q.wait_nonempty()
    q.fail_all(DeadlineExceeded("gone"))
    assert isinstance(r.error, DeadlineExceeded) and len(q) == 0


def test_priority_names() -> None:
    assert Priority.parse("critical") is Priority.CRITICAL
    assert Priority.parse("HIGH") is Priority.HIGH
    assert Priority.parse("medium") is Priority.NORMAL
    assert Priority.parse("low") is Priority.LOW
    assert Priority.parse(2) is Priority.HIGH
    with pytest.raises(ValueError):
        Priority.parse(7)


async def test_ageing_moves_waiting_requests_up_one_class_per_period() -> None:
    clock = Clock()
    q = ModelQueue(1000, clock, aging_s=10.0)
    low = req(["low"], Priority.LOW)
    q.put_nowait(low)
    clock.now += 5
    high = req(["high"], Priority.HIGH)
    q.put_nowait(high)
    assert q.take_batch(1) == [high]  # low has not aged yet
    q.put_nowait(high2 := req(["h2"], Priority.HIGH))
    clock.now += 6  # low waited 11 s: NORMAL now, still behind HIGH
    assert q.take_batch(1) == [high2]
    clock.now += 10  # low waited 21 s: HIGH now; equal deadlines go by arrival
    q.put_nowait(high3 := req(["h3"], Priority.HIGH))
    assert q.take_batch(1) == [low]
    assert q.take_batch(1) == [high3]


async def test_ageing_reaches_critical_and_starvation_is_bounded() -> None:
    clock = Clock()
    q = ModelQueue(10_000, clock, aging_s=1.0)
    low = req(["low"], Priority.LOW)
    q.put_nowait(low)
    served = []
    for _ in range(10):  # a steady stream of HIGH work
        q.put_nowait(req(["h"], Priority.HIGH))
        served.extend(q.take_batch(1))
        clock.now += 0.5
    assert low in served
    # promoted three times at most: 3 s of waiting makes it CRITICAL, so it went within ~6 takes
    assert served.index(low) <= 6


async def test_discard_frees_a_slot_at_once() -> None:
    q = ModelQueue(1, Clock())
    r = req(["a"])
    q.put_nowait(r)
    r.cancel()
    q.discard(r)
    assert len(q) == 0 and q.items == 0
    q.put_nowait(other := req(["b"]))
    assert q.take_batch(5) == [other]


async def test_wait_fuller_returns_on_items_or_critical() -> None:
    import anyio

    q = ModelQueue(100, Clock())
    q.put_nowait(req(["a"]))
    with anyio.move_on_after(0.05) as scope:
        await q.wait_fuller(3)
    assert scope.cancelled_caught
    q.put_nowait(req(["b", "c"]))
    with anyio.fail_after(30):  # a safety net: it returns at once
        await q.wait_fuller(3)
    q2 = ModelQueue(100, Clock())
    q2.put_nowait(req(["x"], Priority.CRITICAL))
    with anyio.fail_after(30):  # a safety net: it returns at once
        await q2.wait_fuller(10)
