"""The SQLite job store's schema: its migrations, and how a row becomes a `JobRecord`."""

from __future__ import annotations

from typing import Any

import msgspec

from .record import JobError, JobRecord, JobRequest

__all__ = ("COLUMNS", "MIGRATIONS", "PENDING", "SCHEMA_VERSION", "encoder", "record")

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        model_id TEXT NOT NULL,
        status TEXT NOT NULL,
        request BLOB NOT NULL,
        priority INTEGER NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        expires_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before REAL NOT NULL DEFAULT 0,
        progress REAL,
        error BLOB,
        idempotency_key TEXT UNIQUE,
        callback_url TEXT
    );
    CREATE INDEX jobs_queue ON jobs (status, priority, created_at);
    CREATE INDEX jobs_expiry ON jobs (expires_at);
    CREATE INDEX jobs_model ON jobs (model_id, created_at);
    CREATE TABLE job_results (
        job_id TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
        body BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    """
    ALTER TABLE jobs ADD COLUMN callback_state TEXT;
    ALTER TABLE jobs ADD COLUMN callback_attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN callback_next REAL NOT NULL DEFAULT 0;
    CREATE INDEX jobs_callbacks ON jobs (callback_state, callback_next);
    """,
    """
    ALTER TABLE jobs ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
    """,
    """
    ALTER TABLE jobs ADD COLUMN owner TEXT;
    CREATE INDEX jobs_owner ON jobs (owner, created_at);
    """,
)
"""`MIGRATIONS[n]` takes the schema from version n to n + 1 (append; never edit a shipped one)."""
SCHEMA_VERSION = len(MIGRATIONS)
PENDING = "callback_state = CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END"
"""A job reaching a final status has its callback (if any) to deliver."""

COLUMNS = (
    "id, model_id, status, request, priority, created_at, updated_at, started_at, finished_at, expires_at,"
    " attempts, not_before, progress, error, idempotency_key, callback_url, callback_state, callback_attempts, owner,"
    " EXISTS (SELECT 1 FROM job_results r WHERE r.job_id = jobs.id)"
)
_request_decoder = msgspec.json.Decoder(JobRequest)
_error_decoder = msgspec.json.Decoder(JobError)
encoder = msgspec.json.Encoder()


def record(row: tuple[Any, ...]) -> JobRecord:
    (jid, model, status, request, priority, created, updated, started, finished, expires) = row[:10]
    attempts, not_before, progress, error, key, callback, cb_state, cb_attempts, owner, has_result = row[10:]
    return JobRecord(
        id=jid,
        model_id=model,
        status=status,
        request=_request_decoder.decode(request),
        priority=priority,
        created_at=created,
        updated_at=updated,
        started_at=started,
        finished_at=finished,
        expires_at=expires,
        attempts=attempts,
        not_before=not_before,
        progress=progress,
        error=None if error is None else _error_decoder.decode(error),
        has_result=bool(has_result),
        idempotency_key=key,
        callback_url=callback,
        callback_state=cb_state,
        callback_attempts=cb_attempts,
        owner=owner,
    )
