"""Jobs belong to the identity that submitted them: another identity gets 404 (NOT_FOUND over gRPC)
for GET, result, cancel and watch, and does not see them listed, unless it has the admin scope.
Without tokens everything is as it was. The store keeps the owner (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from jobs.conftest import JobsApp
from modelmora._proto.modelmora import v1
from modelmora.api.grpc import GrpcListener
from modelmora.errors import IdempotencyConflict
from modelmora.jobs import TERMINAL, JobError, JobRequest, JobStore, SQLiteJobStore
from modelmora.security import Gate
from modelmora.server import bind_socket

pytestmark = pytest.mark.anyio

ALICE = "alice-token-aaaaaaaaaaaaaa"
BOB = "bob-token-bbbbbbbbbbbbbbbbb"
ADMIN = "ops-token-ccccccccccccccccc"
TOKENS = [f"alice infer {ALICE}", f"bob infer {BOB}", f"ops admin,infer {ADMIN}"]
AUTH = pytest.mark.settings(auth={"tokens": TOKENS})
REQ = JobRequest({"text": "hi"})


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def done(app: JobsApp, job_id: str, token: str) -> dict[str, object]:
    while True:
        r = await app.client.get(f"/api/v1/jobs/{job_id}", headers=bearer(token))
        assert r.status_code == 200, r.text
        if r.json()["status"] in TERMINAL:
            return dict(r.json())
        await anyio.sleep(0.02)


@AUTH
async def test_another_identity_is_told_the_job_does_not_exist(jobs_app: JobsApp) -> None:
    r = await jobs_app.client.post(
        "/api/v1/infer/echo/async", json={"input_data": {"text": "mine"}}, headers=bearer(ALICE)
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    await done(jobs_app, job_id, ALICE)
    stored = await jobs_app.jobs.get(job_id)
    assert stored is not None and stored.owner == "alice"
    unknown = await jobs_app.client.get("/api/v1/jobs/0123456789abcdef", headers=bearer(BOB))
    for method, path in (("GET", ""), ("GET", "/result"), ("DELETE", "")):
        r = await jobs_app.client.request(method, f"/api/v1/jobs/{job_id}{path}", headers=bearer(BOB))
        assert r.status_code == 404, r.text  # not 403: the id does not leak
        assert r.json()["error"]["code"] == unknown.json()["error"]["code"] == "job_not_found"
    assert (await jobs_app.client.get("/api/v1/jobs", headers=bearer(BOB))).json() == {"jobs": [], "total": 0}
    mine = (await jobs_app.client.get("/api/v1/jobs", headers=bearer(ALICE))).json()
    assert [j["id"] for j in mine["jobs"]] == [job_id]
    for token in (ALICE, ADMIN):  # the owner and an admin see it
        assert (await jobs_app.client.get(f"/api/v1/jobs/{job_id}/result", headers=bearer(token))).status_code == 200
    assert (await jobs_app.client.get("/api/v1/jobs", headers=bearer(ADMIN))).json()["total"] == 1


@AUTH
async def test_an_admin_cancels_anyones_job_and_keys_are_per_owner(jobs_app: JobsApp) -> None:
    body = {"input_data": {"text": ["__sleep__30", "x"]}}
    key = {"idempotency-key": "k-1"}
    r = await jobs_app.client.post("/api/v1/infer/echo/async", json=body, headers={**bearer(ALICE), **key})
    job_id = r.json()["job_id"]
    again = await jobs_app.client.post("/api/v1/infer/echo/async", json=body, headers={**bearer(ALICE), **key})
    assert again.status_code == 200 and again.json()["job_id"] == job_id
    other = await jobs_app.client.post("/api/v1/infer/echo/async", json=body, headers={**bearer(BOB), **key})
    assert other.status_code == 409 and job_id not in other.text  # another owner's key: not named
    assert (await jobs_app.client.delete(f"/api/v1/jobs/{job_id}", headers=bearer(BOB))).status_code == 404
    r = await jobs_app.client.delete(f"/api/v1/jobs/{job_id}", headers=bearer(ADMIN))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


async def test_without_tokens_every_caller_sees_every_job(jobs_app: JobsApp) -> None:
    r = await jobs_app.client.post("/api/v1/infer/echo/async", json={"input_data": {"text": "x"}})
    job_id = r.json()["job_id"]
    assert (await jobs_app.client.get(f"/api/v1/jobs/{job_id}")).status_code == 200
    assert (await jobs_app.client.get("/api/v1/jobs")).json()["total"] == 1
    stored = await jobs_app.jobs.get(job_id)
    assert stored is not None and stored.owner == "anonymous"


@pytest.fixture
async def job_channel(jobs_app: JobsApp) -> AsyncIterator[Channel]:
    """The gRPC services (JobService included) over the jobs app's runner, behind its tokens."""
    settings = jobs_app.runner.settings
    sock = bind_socket("127.0.0.1", 0)
    listener = GrpcListener(
        jobs_app.runner.service, sock, "http://127.0.0.1/", gate=Gate(settings.auth), jobs=jobs_app.runner
    )
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(listener.serve, stop.wait)
        channel = Channel("127.0.0.1", sock.getsockname()[1])
        try:
            yield channel
        finally:
            channel.close()
            stop.set()
    sock.close()


@AUTH
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # grpclib
async def test_grpc_job_service_answers_not_found_to_another_identity(job_channel: Channel) -> None:
    stub = v1.JobServiceStub(job_channel)
    request = v1.InferAsyncRequest(request=v1.InferRequest(model_id="echo", texts=["__sleep__30", "x"]))
    ref = await stub.infer_async(request, metadata=bearer(ALICE))
    job = v1.JobId(job_id=ref.job_id)
    assert (await stub.get_job(job, metadata=bearer(ALICE))).job_id == ref.job_id
    calls = (stub.get_job, stub.cancel_job, stub.get_job_result)
    for call in calls:
        with pytest.raises(GRPCError) as err:
            await call(job, metadata=bearer(BOB))
        assert err.value.status == Status.NOT_FOUND
    with pytest.raises(GRPCError) as err:
        _ = [j async for j in stub.watch_job(job, metadata=bearer(BOB))]
    assert err.value.status == Status.NOT_FOUND
    cancelled = await stub.cancel_job(job, metadata=bearer(ADMIN))
    assert cancelled.status == v1.JobStatus.CANCELLED


@pytest.fixture(params=["sqlite", "postgres"])
async def store(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[JobStore]:
    if request.param == "sqlite":
        s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
        yield s
        s.close()
        return
    from modelmora.jobs.postgres import PostgresJobStore

    pg = await PostgresJobStore.open(request.getfixturevalue("pg_url"))  # skips on trio
    yield pg
    await pg.aclose()


async def test_the_store_keeps_owners_and_filters_by_them(store: JobStore) -> None:
    a, _ = await store.create("echo", REQ, ttl_s=60, owner="alice", idempotency_key="k")
    b, _ = await store.create("echo", REQ, ttl_s=60, owner="bob")
    assert a.owner == "alice" and b.owner == "bob"
    assert [j.id for j in (await store.list(owner="alice")).jobs] == [a.id]
    assert (await store.list()).total == 2
    assert await store.create("echo", REQ, ttl_s=60, owner="alice", idempotency_key="k") == (a, False)
    with pytest.raises(IdempotencyConflict, match="already in use") as err:
        await store.create("echo", REQ, ttl_s=60, owner="bob", idempotency_key="k")
    assert a.id not in str(err.value)


async def test_claim_job_takes_queued_or_abandoned_jobs_only(store: JobStore) -> None:
    rec, _ = await store.create("echo", REQ, ttl_s=60)
    now = time.time()
    claimed = await store.claim_job(rec.id, now, 10)
    assert claimed is not None and claimed.status == "running" and claimed.attempts == 1
    assert await store.claim_job(rec.id, now, 10) is None  # running on a live lease
    again = await store.claim_job(rec.id, now + 20, 10)  # its lease expired: its server died
    assert again is not None and again.attempts == 2
    assert await store.complete(rec.id, b"{}", time.time(), 60)
    assert await store.claim_job(rec.id, now + 100, 10) is None  # finished
    assert await store.claim_job("nope", now, 10) is None
    later, _ = await store.create("echo", REQ, ttl_s=60)
    await store.claim(time.time(), 5)
    assert await store.retry(later.id, JobError("worker_crashed", "x"), time.time() + 100)
    assert await store.claim_job(later.id, time.time(), 10) is None  # waiting for its retry


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncpg
async def test_postgres_owner_migration_keeps_old_jobs(pg_url: str) -> None:
    import asyncpg

    from modelmora.jobs.postgres import PG_MIGRATIONS, PG_SCHEMA_VERSION, PostgresJobStore

    conn = await asyncpg.connect(pg_url)
    try:
        for script in PG_MIGRATIONS[:2]:
            await conn.execute(script)
        await conn.execute("CREATE TABLE modelmora_schema (name TEXT PRIMARY KEY, version INTEGER)")
        await conn.execute("INSERT INTO modelmora_schema VALUES ('jobs', 2)")
        await conn.execute(
            "INSERT INTO mm_jobs (id, model_id, status, request, priority, created_at, updated_at, expires_at)"
            " VALUES ('old', 'echo', 'queued', $1, 3, 1, 1, 9e9)",
            b'{"input_data": {"text": "hi"}}',
        )
    finally:
        await conn.close()
    store = await PostgresJobStore.open(pg_url)
    try:
        assert await store.schema_version() == PG_SCHEMA_VERSION
        old = await store.get("old")
        assert old is not None and old.owner is None and old.request == REQ
        assert len(store.namespace) == 32
    finally:
        await store.aclose()
    again = await PostgresJobStore.open(pg_url)
    assert again.namespace == store.namespace  # every server sharing the database agrees on it
    await again.aclose()
