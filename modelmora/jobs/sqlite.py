"""Jobs in one SQLite file under `$MODELMORA_HOME` (`jobs.sqlite3`, the embedded default).

WAL mode, a busy timeout and a write transaction (`BEGIN IMMEDIATE`) around every change; each
call runs in a worker thread (`anyio.to_thread`), so the store serves asyncio and trio alike. The
schema is versioned (`PRAGMA user_version`): `MIGRATIONS[n]` brings version n to n + 1, and every
missing step is applied, in one transaction, when the file is opened.
"""

from __future__ import annotations

import builtins
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from .record import JobError, JobPage, JobRecord, JobRequest, JobStatus
from .sqlite_schema import COLUMNS, MIGRATIONS, PENDING, SCHEMA_VERSION, encoder, record
from .store import idempotent

__all__ = ("MIGRATIONS", "SCHEMA_VERSION", "SQLiteJobStore")

T = TypeVar("T")


class SQLiteJobStore:
    """The job store in one SQLite file (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a job's id is handed out only once it is on disk
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._write():
            have = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            for script in MIGRATIONS[have:]:
                for statement in script.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            if have < SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args)

    def _get(self, job_id: str) -> JobRecord | None:
        row = self._db.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else record(row)

    # -- the interface --------------------------------------------------------------------------

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
        return await self._run(self._create, model_id, request, ttl_s, idempotency_key, callback_url, owner)

    def _create(
        self, model_id: str, request: JobRequest, ttl_s: float, key: str | None, callback: str | None, owner: str | None
    ) -> tuple[JobRecord, bool]:
        body = encoder.encode(request)
        with self._write():
            if key is not None:
                row = self._db.execute("SELECT id FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
                if row is not None:
                    old = self._get(row[0])
                    assert old is not None
                    return idempotent(old, key, model_id, request, callback, owner), False
            now = _now()
            job_id = uuid.uuid4().hex
            self._db.execute(
                "INSERT INTO jobs (id, model_id, status, request, priority, created_at, updated_at, expires_at,"
                " idempotency_key, callback_url, owner) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, model_id, body, request.priority, now, now, now + ttl_s, key, callback, owner),
            )
            rec = self._get(job_id)
        assert rec is not None
        return rec, True

    async def get(self, job_id: str) -> JobRecord | None:
        return await self._run(self._locked_get, job_id)

    def _locked_get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._get(job_id)

    async def list(
        self,
        *,
        model_id: str | None = None,
        status: JobStatus | None = None,
        limit: int = 100,
        offset: int = 0,
        owner: str | None = None,
    ) -> JobPage:
        return await self._run(self._list, {"model_id": model_id, "status": status, "owner": owner}, limit, offset)

    def _list(self, filters: dict[str, str | None], limit: int, offset: int) -> JobPage:
        where, args = [], []
        for column, value in filters.items():
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        cond = f" WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            total = self._db.execute(f"SELECT count(*) FROM jobs{cond}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM jobs{cond} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
        return JobPage([record(r) for r in rows], total)

    shared = False
    """One server per file: at start, what it left running runs again at once (`requeue_running`)."""

    async def claim(
        self,
        now: float,
        limit: int,
        lease_s: float = 60.0,
        *,
        prefer: frozenset[str] | None = None,
        cold_after_s: float = 0.0,
    ) -> builtins.list[JobRecord]:
        return await self._run(self._claim, now, limit, lease_s, prefer, cold_after_s)

    def _claim(
        self, now: float, limit: int, lease_s: float, prefer: frozenset[str] | None, cold_after_s: float
    ) -> builtins.list[JobRecord]:
        cond, args = "", []
        if prefer is not None:
            marks = ", ".join("?" * len(prefer))
            cond = f" AND (model_id IN ({marks}) OR created_at <= ?)"
            args = [*sorted(prefer), now - cold_after_s]
        with self._write():
            ids = [
                r[0]
                for r in self._db.execute(
                    f"SELECT id FROM jobs WHERE status = 'queued' AND not_before <= ?{cond}"
                    " ORDER BY priority, created_at LIMIT ?",
                    (now, *args, limit),
                )
            ]
            wall = _now()
            out = []
            for job_id in ids:
                self._db.execute(
                    "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?, updated_at = ?,"
                    " lease_until = ? WHERE id = ?",
                    (wall, wall, wall + lease_s, job_id),
                )
                rec = self._get(job_id)
                assert rec is not None
                out.append(rec)
        return out

    async def claim_job(self, job_id: str, now: float, lease_s: float) -> JobRecord | None:
        return await self._run(self._claim_job, job_id, now, lease_s)

    def _claim_job(self, job_id: str, now: float, lease_s: float) -> JobRecord | None:
        wall = _now()
        with self._write():
            cur = self._db.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?, updated_at = ?,"
                " lease_until = ? WHERE id = ? AND not_before <= ?"
                " AND (status = 'queued' OR (status = 'running' AND lease_until < ?))",
                (wall, wall, wall + lease_s, job_id, now, now),
            )
            return self._get(job_id) if cur.rowcount else None

    async def next_due(self) -> float | None:
        return await self._run(self._next_due)

    def _next_due(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT min(not_before) FROM jobs WHERE status = 'queued'").fetchone()
        return None if row[0] is None else float(row[0])

    async def complete(self, job_id: str, result: bytes, now: float, ttl_s: float) -> bool:
        return await self._run(self._complete, job_id, result, now, ttl_s)

    def _complete(self, job_id: str, result: bytes, now: float, ttl_s: float) -> bool:
        with self._write():
            cur = self._db.execute(
                "UPDATE jobs SET status = 'completed', finished_at = ?, updated_at = ?, expires_at = ?,"
                f" progress = 1.0, error = NULL, {PENDING}"
                " WHERE id = ? AND status = 'running'",
                (now, now, now + ttl_s, job_id),
            )
            if not cur.rowcount:
                return False
            self._db.execute(
                "INSERT INTO job_results (job_id, body, created_at) VALUES (?, ?, ?)", (job_id, result, now)
            )
        return True

    async def retry(self, job_id: str, error: JobError, not_before: float) -> bool:
        return await self._run(self._retry, job_id, error, not_before)

    def _retry(self, job_id: str, error: JobError, not_before: float) -> bool:
        with self._write():
            cur = self._db.execute(
                "UPDATE jobs SET status = 'queued', not_before = ?, error = ?, updated_at = ?"
                " WHERE id = ? AND status = 'running'",
                (not_before, encoder.encode(error), _now(), job_id),
            )
        return cur.rowcount > 0

    async def fail(self, job_id: str, error: JobError, now: float, ttl_s: float) -> bool:
        return await self._run(self._fail, job_id, error, now, ttl_s)

    def _fail(self, job_id: str, error: JobError, now: float, ttl_s: float) -> bool:
        with self._write():
            cur = self._db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, updated_at = ?, expires_at = ?,"
                f"{PENDING}"
                " WHERE id = ? AND status = 'running'",
                (encoder.encode(error), now, now, now + ttl_s, job_id),
            )
        return cur.rowcount > 0

    async def progress(self, job_id: str, fraction: float) -> None:
        await self._run(self._progress, job_id, fraction)

    def _progress(self, job_id: str, fraction: float) -> None:
        with self._write():
            self._db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'running'", (fraction, job_id))

    async def cancel(self, job_id: str, now: float, ttl_s: float) -> JobRecord | None:
        return await self._run(self._cancel, job_id, now, ttl_s)

    def _cancel(self, job_id: str, now: float, ttl_s: float) -> JobRecord | None:
        with self._write():
            self._db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, updated_at = ?, expires_at = ?,"
                f"{PENDING}"
                " WHERE id = ? AND status IN ('queued', 'running')",
                (now, now, now + ttl_s, job_id),
            )
            return self._get(job_id)

    async def requeue_running(self) -> int:
        return await self._run(self._requeue_running)

    def _requeue_running(self) -> int:
        with self._write():
            cur = self._db.execute(
                "UPDATE jobs SET status = 'queued', not_before = 0, updated_at = ? WHERE status = 'running'",
                (_now(),),
            )
        return cur.rowcount

    async def renew(self, job_ids: builtins.list[str], until: float) -> None:
        await self._run(self._renew, job_ids, until)

    def _renew(self, job_ids: builtins.list[str], until: float) -> None:
        with self._write():
            self._db.executemany(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND status = 'running'", [(until, j) for j in job_ids]
            )

    async def requeue_expired(self, now: float) -> int:
        return await self._run(self._requeue_expired, now)

    def _requeue_expired(self, now: float) -> int:
        with self._write():
            cur = self._db.execute(
                "UPDATE jobs SET status = 'queued', not_before = 0, updated_at = ?"
                " WHERE status = 'running' AND lease_until < ?",
                (_now(), now),
            )
        return cur.rowcount

    async def result(self, job_id: str) -> bytes | None:
        return await self._run(self._result, job_id)

    def _result(self, job_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM job_results WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else bytes(row[0])

    async def sweep(self, now: float, ttl_s: float) -> tuple[int, int]:
        return await self._run(self._sweep, now, ttl_s)

    def _sweep(self, now: float, ttl_s: float) -> tuple[int, int]:
        with self._write():
            expired = self._db.execute(
                "UPDATE jobs SET status = 'expired', finished_at = ?, updated_at = ?, expires_at = ?,"
                f"{PENDING}"
                " WHERE status = 'queued' AND expires_at <= ?",
                (now, now, now + ttl_s, now),
            ).rowcount
            deleted = self._db.execute(
                "DELETE FROM jobs WHERE status NOT IN ('queued', 'running') AND expires_at <= ?", (now,)
            ).rowcount
        return expired, deleted

    async def due_callbacks(self, now: float, limit: int) -> builtins.list[JobRecord]:
        return await self._run(self._due_callbacks, now, limit)

    def _due_callbacks(self, now: float, limit: int) -> builtins.list[JobRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE callback_state = 'pending' AND callback_next <= ?"
                " ORDER BY callback_next LIMIT ?",
                (now, limit),
            ).fetchall()
        return [record(r) for r in rows]

    async def callback_attempted(self, job_id: str, *, delivered: bool, retry_at: float | None) -> None:
        await self._run(self._callback_attempted, job_id, delivered, retry_at)

    def _callback_attempted(self, job_id: str, delivered: bool, retry_at: float | None) -> None:
        state = "delivered" if delivered else ("pending" if retry_at is not None else "failed")
        with self._write():
            self._db.execute(
                "UPDATE jobs SET callback_state = ?, callback_attempts = callback_attempts + 1, callback_next = ?"
                " WHERE id = ? AND callback_state = 'pending'",
                (state, retry_at or 0.0, job_id),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _now() -> float:
    return time.time()
