"""The SQLite job store: commit before the id is handed out, conditional transitions, exactly one
result per job, idempotency keys, restart re-queue, sweeping, migrations (asyncio and trio)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from modelmora.errors import IdempotencyConflict
from modelmora.jobs import MIGRATIONS, SCHEMA_VERSION, JobError, JobRequest, JobStore, SQLiteJobStore, backoff_s

pytestmark = pytest.mark.anyio

REQ = JobRequest({"text": "hi"})
ERR = JobError("worker_crashed", "the worker died")


@pytest.fixture(params=["sqlite", "postgres"])
async def store(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[JobStore]:
    """Each store test runs on SQLite (asyncio and trio) and PostgreSQL (asyncio)."""
    if request.param == "sqlite":
        s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
        yield s
        s.close()
        return
    from modelmora.jobs.postgres import PostgresJobStore

    url = request.getfixturevalue("pg_url")  # skips on trio
    pg = await PostgresJobStore.open(url)
    yield pg
    await pg.aclose()


async def test_create_is_committed_before_it_returns(tmp_path: Path, store: JobStore) -> None:
    rec, created = await store.create("echo", REQ, ttl_s=60)
    assert created and rec.status == "queued" and rec.attempts == 0 and not rec.has_result
    if isinstance(store, SQLiteJobStore):
        other = sqlite3.connect(tmp_path / "jobs.sqlite3")  # another connection sees it at once
        assert other.execute("SELECT status FROM jobs WHERE id = ?", (rec.id,)).fetchone() == ("queued",)
        other.close()
    assert await store.get(rec.id) == rec
    assert await store.get("nope") is None


async def test_claim_complete_gives_exactly_one_result(store: JobStore) -> None:
    rec, _ = await store.create("echo", REQ, ttl_s=60)
    (claimed,) = await store.claim(time.time(), 10)
    assert claimed.id == rec.id and claimed.status == "running" and claimed.attempts == 1
    assert await store.claim(time.time(), 10) == []
    assert await store.complete(rec.id, b'{"a":1}', time.time(), 60)
    assert not await store.complete(rec.id, b'{"a":2}', time.time(), 60)  # a second run's result is dropped
    done = await store.get(rec.id)
    assert done is not None and done.status == "completed" and done.has_result and done.progress == 1.0
    assert await store.result(rec.id) == b'{"a":1}'


async def test_priority_then_age_order_and_due_time(store: JobStore) -> None:
    low, _ = await store.create("echo", JobRequest({"text": "a"}, priority=4), ttl_s=60)
    high, _ = await store.create("echo", JobRequest({"text": "b"}, priority=1), ttl_s=60)
    normal, _ = await store.create("echo", REQ, ttl_s=60)
    assert [j.id for j in await store.claim(time.time(), 2)] == [high.id, normal.id]
    assert await store.retry(high.id, ERR, time.time() + 100)
    assert [j.id for j in await store.claim(time.time(), 5)] == [low.id]  # the retry is not due yet
    due = await store.next_due()
    assert due is not None and due > time.time() + 50
    (again,) = await store.claim(time.time() + 101, 5)
    assert again.id == high.id and again.attempts == 2 and again.error == ERR


async def test_cancel_and_fail_only_from_live_states(store: JobStore) -> None:
    queued, _ = await store.create("echo", REQ, ttl_s=60)
    rec = await store.cancel(queued.id, time.time(), 60)
    assert rec is not None and rec.status == "cancelled" and rec.finished_at is not None
    assert await store.claim(time.time(), 5) == []
    running, _ = await store.create("echo", REQ, ttl_s=60)
    await store.claim(time.time(), 5)
    rec = await store.cancel(running.id, time.time(), 60)
    assert rec is not None and rec.status == "cancelled"
    assert not await store.complete(running.id, b"{}", time.time(), 60)  # cancelled: no result, ever
    assert not await store.fail(running.id, ERR, time.time(), 60)
    assert await store.result(running.id) is None
    assert await store.cancel("nope", time.time(), 60) is None
    failing, _ = await store.create("echo", REQ, ttl_s=60)
    await store.claim(time.time(), 5)
    assert await store.fail(failing.id, ERR, time.time(), 60)
    rec = await store.cancel(failing.id, time.time(), 60)
    assert rec is not None and rec.status == "failed" and rec.error == ERR  # finished: unchanged


async def test_idempotency_key(store: JobStore) -> None:
    first, created = await store.create("echo", REQ, ttl_s=60, idempotency_key="k1")
    again, created_again = await store.create("echo", REQ, ttl_s=60, idempotency_key="k1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict, match="k1"):
        await store.create("echo", JobRequest({"text": "other"}), ttl_s=60, idempotency_key="k1")
    with pytest.raises(IdempotencyConflict):
        await store.create("other-model", REQ, ttl_s=60, idempotency_key="k1")
    assert (await store.list()).total == 1


async def test_requeue_running_at_restart(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    s = SQLiteJobStore(path)
    rec, _ = await s.create("echo", REQ, ttl_s=60)
    await s.claim(time.time(), 5)
    s.close()  # the server died with the job running
    s = SQLiteJobStore(path)
    assert await s.requeue_running() == 1
    (again,) = await s.claim(time.time(), 5)
    assert again.id == rec.id and again.attempts == 2
    s.close()


async def test_list_filters_and_pages(store: JobStore) -> None:
    ids = [(await store.create("a" if i % 2 else "b", REQ, ttl_s=60))[0].id for i in range(6)]
    await anyio.lowlevel.checkpoint()
    page = await store.list(model_id="a", limit=2)
    assert page.total == 3 and [j.model_id for j in page.jobs] == ["a", "a"]
    rest = await store.list(model_id="a", limit=2, offset=2)
    assert len(rest.jobs) == 1
    await store.claim(time.time(), 1)
    assert (await store.list(status="running")).total == 1
    assert (await store.list(status="queued")).total == 5
    assert {j.id for j in (await store.list(limit=100)).jobs} == set(ids)


async def test_sweep_expires_queued_and_deletes_finished(store: JobStore) -> None:
    old, _ = await store.create("echo", REQ, ttl_s=10)
    done, _ = await store.create("echo", REQ, ttl_s=10)
    (claimed,) = await store.claim(time.time(), 1)
    other = done.id if claimed.id == old.id else old.id
    assert await store.complete(claimed.id, b"{}", time.time(), 10)
    assert await store.sweep(time.time(), 10) == (0, 0)
    expired, deleted = await store.sweep(time.time() + 11, 10)
    assert (expired, deleted) == (1, 1)
    assert await store.get(claimed.id) is None and await store.result(claimed.id) is None
    rec = await store.get(other)
    assert rec is not None and rec.status == "expired"
    assert await store.sweep(time.time() + 30, 10) == (0, 1)  # kept one more ttl, then deleted


async def test_schema_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    s = SQLiteJobStore(path)
    assert s.schema_version == SCHEMA_VERSION
    s.close()
    s = SQLiteJobStore(path)  # opening again applies nothing twice
    assert s.schema_version == SCHEMA_VERSION
    s.close()


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff_s(n, 1.0, 5.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff_s(0, 0.5, 5.0) == 0.5


async def test_an_older_schema_is_migrated_with_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute(
        "INSERT INTO jobs (id, model_id, status, request, priority, created_at, updated_at, expires_at)"
        " VALUES ('old', 'echo', 'queued', ?, 3, 1, 1, 9e9)",
        (b'{"input_data": {"text": "hi"}}',),
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    s = SQLiteJobStore(path)
    assert s.schema_version == SCHEMA_VERSION == 4
    rec = await s.get("old")
    assert rec is not None and rec.request == REQ and rec.callback_state is None and rec.owner is None
    (claimed,) = await s.claim(time.time(), 1)
    assert await s.complete(claimed.id, b"{}", time.time(), 60)
    assert (await s.due_callbacks(time.time(), 5)) == []  # no callback_url: nothing to deliver
    s.close()


async def test_callback_state_follows_the_final_status(store: JobStore) -> None:
    rec, _ = await store.create("echo", REQ, ttl_s=60, callback_url="http://example.com/hook")
    assert rec.callback_state is None and await store.due_callbacks(time.time(), 5) == []
    await store.claim(time.time(), 1)
    await store.fail(rec.id, ERR, time.time(), 60)
    (due,) = await store.due_callbacks(time.time(), 5)
    assert due.id == rec.id and due.callback_state == "pending"
    await store.callback_attempted(rec.id, delivered=False, retry_at=time.time() + 100)
    assert await store.due_callbacks(time.time(), 5) == []
    (again,) = await store.due_callbacks(time.time() + 101, 5)
    assert again.callback_attempts == 1
    await store.callback_attempted(rec.id, delivered=True, retry_at=None)
    done = await store.get(rec.id)
    assert done is not None and done.callback_state == "delivered" and done.callback_attempts == 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncpg
async def test_postgres_requeues_running_and_migrates_once(pg_url: str) -> None:
    from modelmora.jobs.postgres import PG_SCHEMA_VERSION, PostgresJobStore

    first = await PostgresJobStore.open(pg_url)
    rec, _ = await first.create("echo", REQ, ttl_s=60)
    await first.claim(time.time(), 5)
    await first.aclose()  # the server died with the job running
    again = await PostgresJobStore.open(pg_url)  # migrations already applied: nothing twice
    assert await again.schema_version() == PG_SCHEMA_VERSION
    assert await again.requeue_running() == 1
    (claimed,) = await again.claim(time.time(), 5)
    assert claimed.id == rec.id and claimed.attempts == 2
    await again.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncpg
async def test_postgres_claims_never_overlap(pg_url: str) -> None:
    from modelmora.jobs.postgres import PostgresJobStore

    a, b = await PostgresJobStore.open(pg_url), await PostgresJobStore.open(pg_url)
    ids = {(await a.create("echo", JobRequest({"text": str(i)}), ttl_s=60))[0].id for i in range(40)}
    taken: list[str] = []

    async def take(s: PostgresJobStore) -> None:
        while batch := await s.claim(time.time(), 3):
            taken.extend(j.id for j in batch)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, a)
        tg.start_soon(take, b)
    assert sorted(taken) == sorted(ids)  # every job once, none twice
    await a.aclose()
    await b.aclose()


async def test_leases_expire_unless_renewed(store: JobStore) -> None:
    a, _ = await store.create("echo", REQ, ttl_s=60)
    b, _ = await store.create("echo", REQ, ttl_s=60)
    await store.claim(time.time(), 5, lease_s=10)
    await store.renew([a.id], time.time() + 200)  # a's server is alive; b's died
    assert await store.requeue_expired(time.time()) == 0
    assert await store.requeue_expired(time.time() + 100) == 1
    (again,) = await store.claim(time.time(), 5)
    assert again.id == b.id and again.attempts == 2
    still = await store.get(a.id)
    assert still is not None and still.status == "running" and still.attempts == 1


async def test_a_server_prefers_the_models_it_holds_warm(store: JobStore) -> None:
    cold, _ = await store.create("other", REQ, ttl_s=60)
    warm, _ = await store.create("echo", REQ, ttl_s=60)
    now = time.time()
    (first,) = await store.claim(now, 5, prefer=frozenset({"echo"}), cold_after_s=100)
    assert first.id == warm.id  # the other model's job waits for a server that holds it
    assert await store.claim(now, 5, prefer=frozenset(), cold_after_s=100) == []
    (late,) = await store.claim(now + 101, 5, prefer=frozenset(), cold_after_s=100)  # waited long enough
    assert late.id == cold.id
