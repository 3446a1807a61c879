"""Jobs in PostgreSQL (`database_url = "postgresql://..."`), through asyncpg: asyncio only.

The same promises as the SQLite store: every change is one transaction, conditional on the state it
leaves; `claim` takes jobs with `FOR UPDATE SKIP LOCKED`, so several servers sharing the database
never take one job twice. The schema is versioned in `modelmora_schema` (`MIGRATIONS[n]` brings
version n to n + 1), applied at start under an advisory lock (servers starting together migrate once).
"""

from __future__ import annotations

import builtins
import time
import uuid
from typing import Any

import anyio
import asyncpg
import msgspec

from .record import JobError, JobPage, JobRecord, JobRequest, JobStatus
from .store import idempotent

__all__ = ("PG_MIGRATIONS", "PG_SCHEMA_VERSION", "PostgresJobStore")

PG_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE mm_jobs (
        id TEXT PRIMARY KEY,
        model_id TEXT NOT NULL,
        status TEXT NOT NULL,
        request BYTEA NOT NULL,
        priority INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        expires_at DOUBLE PRECISION NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before DOUBLE PRECISION NOT NULL DEFAULT 0,
        progress DOUBLE PRECISION,
        error BYTEA,
        idempotency_key TEXT UNIQUE,
        callback_url TEXT,
        callback_state TEXT,
        callback_attempts INTEGER NOT NULL DEFAULT 0,
        callback_next DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE INDEX mm_jobs_queue ON mm_jobs (status, priority, created_at);
    CREATE INDEX mm_jobs_expiry ON mm_jobs (expires_at);
    CREATE INDEX mm_jobs_model ON mm_jobs (model_id, created_at);
    CREATE INDEX mm_jobs_callbacks ON mm_jobs (callback_state, callback_next);
    CREATE TABLE mm_job_results (
        job_id TEXT PRIMARY KEY REFERENCES mm_jobs(id) ON DELETE CASCADE,
        body BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    """,
    """
    ALTER TABLE mm_jobs ADD COLUMN lease_until DOUBLE PRECISION NOT NULL DEFAULT 0;
    """,
    """
    ALTER TABLE mm_jobs ADD COLUMN owner TEXT;
    CREATE INDEX mm_jobs_owner ON mm_jobs (owner, created_at);
    CREATE TABLE mm_jobs_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO mm_jobs_meta (name, value) VALUES ('namespace', md5(random()::text || clock_timestamp()::text));
    """,
)
"""`PG_MIGRATIONS[n]` takes the jobs schema from version n to n + 1 (append; never edit a shipped one)."""
PG_SCHEMA_VERSION = len(PG_MIGRATIONS)
_LOCK_ID = 0x6D6D6A6F62  # the advisory lock migrations run under
_PENDING = "callback_state = CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END"
_COLUMNS = (
    "id, model_id, status, request, priority, created_at, updated_at, started_at, finished_at, expires_at,"
    " attempts, not_before, progress, error, idempotency_key, callback_url, callback_state, callback_attempts, owner,"
    " EXISTS (SELECT 1 FROM mm_job_results r WHERE r.job_id = mm_jobs.id) AS has_result"
)
_request_decoder = msgspec.json.Decoder(JobRequest)
_error_decoder = msgspec.json.Decoder(JobError)
_encoder = msgspec.json.Encoder()


def _record(row: Any) -> JobRecord:
    return JobRecord(
        id=row["id"],
        model_id=row["model_id"],
        status=row["status"],
        request=_request_decoder.decode(row["request"]),
        priority=row["priority"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        expires_at=row["expires_at"],
        attempts=row["attempts"],
        not_before=row["not_before"],
        progress=row["progress"],
        error=None if row["error"] is None else _error_decoder.decode(row["error"]),
        has_result=bool(row["has_result"]),
        idempotency_key=row["idempotency_key"],
        callback_url=row["callback_url"],
        callback_state=row["callback_state"],
        callback_attempts=row["callback_attempts"],
        owner=row["owner"],
    )


class PostgresJobStore:
    """The job store in PostgreSQL (see the module's docstring); open it with `open`."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.namespace = ""
        """A random id made when the schema was created: the Redis keys of the servers sharing
        this database start with it (`redis_url`), whatever host name each one reaches it by."""

    @classmethod
    async def open(cls, url: str, *, attempts: int = 5, retry_s: float = 1.0) -> PostgresJobStore:
        """Connect (retrying while the database is unreachable: `attempts` tries, `retry_s` apart,
        doubled each time) and migrate.

        Raises:
            OSError, asyncpg.PostgresError: still unreachable, or refused (credentials, database).
        """
        for attempt in range(1, attempts + 1):
            try:
                pool = await asyncpg.create_pool(url, min_size=1, max_size=8)
                break
            except (OSError, asyncpg.CannotConnectNowError):
                if attempt == attempts:
                    raise
                await anyio.sleep(retry_s * 2 ** (attempt - 1))
        store = cls(pool)
        try:
            await store._migrate()
            store.namespace = await pool.fetchval("SELECT value FROM mm_jobs_meta WHERE name = 'namespace'")
        except BaseException:
            await pool.close()
            raise
        return store

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            await conn.execute("CREATE TABLE IF NOT EXISTS modelmora_schema (name TEXT PRIMARY KEY, version INTEGER)")
            have = await conn.fetchval("SELECT version FROM modelmora_schema WHERE name = 'jobs'") or 0
            for script in PG_MIGRATIONS[have:]:
                await conn.execute(script)
            await conn.execute(
                "INSERT INTO modelmora_schema (name, version) VALUES ('jobs', $1)"
                " ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version",
                PG_SCHEMA_VERSION,
            )

    async def schema_version(self) -> int:
        return int(await self._pool.fetchval("SELECT version FROM modelmora_schema WHERE name = 'jobs'"))

    async def _get(self, conn: Any, job_id: str) -> JobRecord | None:
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM mm_jobs WHERE id = $1", job_id)
        return None if row is None else _record(row)

    async def create(
        self,
        model_id: str,
        request: JobRequest,
        *,
        ttl_s: float,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        owner: str | None = None,
    ) -> tuple[JobRecord, bool]:
        body = _encoder.encode(request)
        now = time.time()
        job_id = uuid.uuid4().hex
        async with self._pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO mm_jobs (id, model_id, status, request, priority, created_at, updated_at, expires_at,"
                " idempotency_key, callback_url, owner) VALUES ($1, $2, 'queued', $3, $4, $5, $5, $6, $7, $8, $9)"
                " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                job_id,
                model_id,
                body,
                request.priority,
                now,
                now + ttl_s,
                idempotency_key,
                callback_url,
                owner,
            )
            if inserted is None:  # the key names a job already
                assert idempotency_key is not None
                old_id = await conn.fetchval("SELECT id FROM mm_jobs WHERE idempotency_key = $1", idempotency_key)
                old = await self._get(conn, old_id)
                assert old is not None
                return idempotent(old, idempotency_key, model_id, request, callback_url, owner), False
            rec = await self._get(conn, job_id)
        assert rec is not None
        return rec, True

    async def get(self, job_id: str) -> JobRecord | None:
        async with self._pool.acquire() as conn:
            return await self._get(conn, job_id)

    async def list(
        self,
        *,
        model_id: str | None = None,
        status: JobStatus | None = None,
        limit: int = 100,
        offset: int = 0,
        owner: str | None = None,
    ) -> JobPage:
        where, args = [], []
        for column, value in (("model_id", model_id), ("status", status), ("owner", owner)):
            if value is not None:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        cond = f" WHERE {' AND '.join(where)}" if where else ""
        async with self._pool.acquire() as conn:
            total = await conn.fetchval(f"SELECT count(*) FROM mm_jobs{cond}", *args)
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM mm_jobs{cond} ORDER BY created_at DESC, id"
                f" LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}",
                *args,
                limit,
                offset,
            )
        return JobPage([_record(r) for r in rows], int(total))

    shared = True
    """Several servers may share the database: a job whose server died runs again once its lease
    expires (`requeue_expired`), never at another server's start."""

    async def claim(
        self,
        now: float,
        limit: int,
        lease_s: float = 60.0,
        *,
        prefer: frozenset[str] | None = None,
        cold_after_s: float = 0.0,
    ) -> builtins.list[JobRecord]:
        wall = time.time()
        cond = "" if prefer is None else " AND (model_id = ANY($5::text[]) OR created_at <= $6)"
        extra = [] if prefer is None else [sorted(prefer), now - cold_after_s]
        async with self._pool.acquire() as conn, conn.transaction():
            ids = await conn.fetch(
                "UPDATE mm_jobs SET status = 'running', attempts = attempts + 1, started_at = $1, updated_at = $1,"
                " lease_until = $4 WHERE id IN (SELECT id FROM mm_jobs WHERE status = 'queued' AND not_before <= $2"
                f"{cond} ORDER BY priority, created_at LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING id",
                wall,
                now,
                limit,
                wall + lease_s,
                *extra,
            )
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM mm_jobs WHERE id = ANY($1::text[]) ORDER BY priority, created_at",
                [r["id"] for r in ids],
            )
        return [_record(r) for r in rows]

    async def claim_job(self, job_id: str, now: float, lease_s: float) -> JobRecord | None:
        wall = time.time()
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                "UPDATE mm_jobs SET status = 'running', attempts = attempts + 1, started_at = $1, updated_at = $1,"
                " lease_until = $2 WHERE id = $3 AND not_before <= $4"
                " AND (status = 'queued' OR (status = 'running' AND lease_until < $4)) RETURNING id",
                wall,
                wall + lease_s,
                job_id,
                now,
            )
            return None if done is None else await self._get(conn, job_id)

    async def next_due(self) -> float | None:
        value = await self._pool.fetchval("SELECT min(not_before) FROM mm_jobs WHERE status = 'queued'")
        return None if value is None else float(value)

    async def complete(self, job_id: str, result: bytes, now: float, ttl_s: float) -> bool:
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                "UPDATE mm_jobs SET status = 'completed', finished_at = $1, updated_at = $1, expires_at = $2,"
                f" progress = 1.0, error = NULL, {_PENDING} WHERE id = $3 AND status = 'running' RETURNING id",
                now,
                now + ttl_s,
                job_id,
            )
            if done is None:
                return False
            await conn.execute(
                "INSERT INTO mm_job_results (job_id, body, created_at) VALUES ($1, $2, $3)", job_id, result, now
            )
        return True

    async def retry(self, job_id: str, error: JobError, not_before: float) -> bool:
        done = await self._pool.fetchval(
            "UPDATE mm_jobs SET status = 'queued', not_before = $1, error = $2, updated_at = $3"
            " WHERE id = $4 AND status = 'running' RETURNING id",
            not_before,
            _encoder.encode(error),
            time.time(),
            job_id,
        )
        return done is not None

    async def fail(self, job_id: str, error: JobError, now: float, ttl_s: float) -> bool:
        done = await self._pool.fetchval(
            "UPDATE mm_jobs SET status = 'failed', error = $1, finished_at = $2, updated_at = $2, expires_at = $3,"
            f" {_PENDING} WHERE id = $4 AND status = 'running' RETURNING id",
            _encoder.encode(error),
            now,
            now + ttl_s,
            job_id,
        )
        return done is not None

    async def progress(self, job_id: str, fraction: float) -> None:
        await self._pool.execute(
            "UPDATE mm_jobs SET progress = $1 WHERE id = $2 AND status = 'running'", fraction, job_id
        )

    async def cancel(self, job_id: str, now: float, ttl_s: float) -> JobRecord | None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE mm_jobs SET status = 'cancelled', finished_at = $1, updated_at = $1, expires_at = $2,"
                f" {_PENDING} WHERE id = $3 AND status IN ('queued', 'running')",
                now,
                now + ttl_s,
                job_id,
            )
            return await self._get(conn, job_id)

    async def requeue_running(self) -> int:
        status = await self._pool.execute(
            "UPDATE mm_jobs SET status = 'queued', not_before = 0, updated_at = $1 WHERE status = 'running'",
            time.time(),
        )
        return int(status.split()[-1])

    async def renew(self, job_ids: builtins.list[str], until: float) -> None:
        await self._pool.execute(
            "UPDATE mm_jobs SET lease_until = $1 WHERE id = ANY($2::text[]) AND status = 'running'", until, job_ids
        )

    async def requeue_expired(self, now: float) -> int:
        status = await self._pool.execute(
            "UPDATE mm_jobs SET status = 'queued', not_before = 0, updated_at = $1"
            " WHERE status = 'running' AND lease_until < $2",
            time.time(),
            now,
        )
        return int(status.split()[-1])

    async def result(self, job_id: str) -> bytes | None:
        body = await self._pool.fetchval("SELECT body FROM mm_job_results WHERE job_id = $1", job_id)
        return None if body is None else bytes(body)

    async def sweep(self, now: float, ttl_s: float) -> tuple[int, int]:
        async with self._pool.acquire() as conn, conn.transaction():
            expired = await conn.execute(
                "UPDATE mm_jobs SET status = 'expired', finished_at = $1, updated_at = $1, expires_at = $2,"
                f" {_PENDING} WHERE status = 'queued' AND expires_at <= $1",
                now,
                now + ttl_s,
            )
            deleted = await conn.execute(
                "DELETE FROM mm_jobs WHERE status NOT IN ('queued', 'running') AND expires_at <= $1", now
            )
        return int(expired.split()[-1]), int(deleted.split()[-1])

    async def due_callbacks(self, now: float, limit: int) -> builtins.list[JobRecord]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM mm_jobs WHERE callback_state = 'pending' AND callback_next <= $1"
            " ORDER BY callback_next LIMIT $2",
            now,
            limit,
        )
        return [_record(r) for r in rows]

    async def callback_attempted(self, job_id: str, *, delivered: bool, retry_at: float | None) -> None:
        state = "delivered" if delivered else ("pending" if retry_at is not None else "failed")
        await self._pool.execute(
            "UPDATE mm_jobs SET callback_state = $1, callback_attempts = callback_attempts + 1, callback_next = $2"
            " WHERE id = $3 AND callback_state = 'pending'",
            state,
            retry_at or 0.0,
            job_id,
        )

    async def aclose(self) -> None:
        await self._pool.close()

    def close(self) -> None:
        """The pool closes with `aclose` (asyncpg needs the event loop); nothing to do here."""
