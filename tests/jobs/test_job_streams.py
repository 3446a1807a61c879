"""The job streams in Redis (asyncio: redis-py's asyncio client), each test under its own key
prefix in the Redis MODELMORA_TEST_REDIS_URL names: entries reach one consumer of the group, a
server takes its warm models' entries at once and the others' once they waited, the entries of a
consumer that died are claimed after the idle time unless renewed, acknowledged entries are gone,
and a lost group (Redis restarted) is made again."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from modelmora.jobs.streams import GROUP, RedisDispatch

from conftest import RedisUnderTest

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client


@pytest.fixture
async def pair(test_redis: RedisUnderTest) -> AsyncIterator[tuple[RedisDispatch, RedisDispatch]]:
    """Two servers' dispatches on one prefix; an entry idle 300 ms may be claimed by the other."""
    a = RedisDispatch(test_redis.url, test_redis.prefix, claim_idle_s=0.3, consumer="a")
    b = RedisDispatch(test_redis.url, test_redis.prefix, claim_idle_s=0.3, consumer="b")
    yield a, b
    await a.aclose()
    await b.aclose()


async def test_each_entry_reaches_one_server(pair: tuple[RedisDispatch, RedisDispatch]) -> None:
    a, b = pair
    for i in range(10):
        await a.publish("echo", f"job{i}")
    first = await a.take(4, None, 0)
    rest = await b.take(100, None, 0)
    assert [e.job_id for e in first + rest] == [f"job{i}" for i in range(10)]
    assert await a.take(100, None, 0) == [] and await b.take(100, None, 0) == []
    await a.ack(first)
    await b.ack(rest)
    assert await a.redis.xlen(a.stream("echo")) == 0  # acknowledged entries are deleted
    assert (await a.redis.xpending(a.stream("echo"), GROUP))["pending"] == 0


async def test_warm_streams_first_others_once_they_waited(pair: tuple[RedisDispatch, RedisDispatch]) -> None:
    a, _ = pair
    await a.publish("cold", "c1")
    await a.publish("echo", "w1")
    warm = frozenset({"echo"})
    assert [e.job_id for e in await a.take(10, warm, 60)] == ["w1"]  # "cold" waits for its server
    assert await a.take(10, warm, 60) == []
    assert [e.job_id for e in await a.take(10, warm, 0)] == ["c1"]  # waited long enough


async def test_a_dead_servers_entries_are_claimed_after_the_idle_time(
    pair: tuple[RedisDispatch, RedisDispatch],
) -> None:
    a, b = pair
    await a.publish("echo", "j1")
    await a.publish("echo", "j2")
    taken = await a.take(10, None, 0)  # a takes both, then renews j1 only: it dies running j2
    assert {e.job_id for e in taken} == {"j1", "j2"}
    assert await b.take(10, None, 0) == []  # pending on a, not idle long yet
    claimed = []
    for _ in range(200):  # a failsafe loop: the idle time is 0.3 s
        await a.touch([e for e in taken if e.job_id == "j1"])
        claimed = await b.take(10, None, 0)
        if claimed:
            break
        await anyio.sleep(0.05)
    assert [e.job_id for e in claimed] == ["j2"]


async def test_a_lost_group_is_made_again(pair: tuple[RedisDispatch, RedisDispatch]) -> None:
    a, b = pair
    await a.publish("echo", "j1")
    await a.redis.delete(a.stream("echo"))  # as a Redis restarted without persistence
    await a.publish("echo", "j2")  # a made the group before: the stream comes back without it
    assert [e.job_id for e in await b.take(10, None, 0)] == ["j2"]  # NOGROUP: made again, from the start


async def test_an_entry_without_a_job_is_acknowledged(pair: tuple[RedisDispatch, RedisDispatch]) -> None:
    a, _ = pair
    await a.publish("echo", "j1")
    await a.redis.xadd(a.stream("echo"), {"other": "x"})
    assert [e.job_id for e in await a.take(10, None, 0)] == ["j1"]
    assert (await a.redis.xpending(a.stream("echo"), GROUP))["pending"] == 1
