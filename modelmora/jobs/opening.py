"""Opening the job store the settings name: `database_url` empty, SQLite under the home; a
`postgresql://` URL, PostgreSQL (asyncio only)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from ..config import ConfigError, Settings
from .sqlite import SQLiteJobStore
from .store import JobStore

__all__ = ("JOBS_FILE", "open_job_store", "redact_url")

JOBS_FILE = "jobs.sqlite3"
"""The SQLite job store's file under `$MODELMORA_HOME`."""
_SCHEMES = ("postgresql://", "postgres://")


def redact_url(url: str) -> str:
    """`url` with its password (and user) hidden, for messages."""
    return re.sub(r"//[^@/]*@", "//***@", url)


@asynccontextmanager
async def open_job_store(settings: Settings, home: Path) -> AsyncIterator[JobStore]:
    """The job store, open while the context is.

    Raises:
        ConfigError: `database_url` is not a PostgreSQL URL.
        OSError, sqlite3.Error, asyncpg.PostgresError: the store cannot be opened (PostgreSQL:
            after retrying a database that does not answer).
    """
    url = settings.database_url
    if not url:
        sqlite = SQLiteJobStore(home / JOBS_FILE)
        try:
            yield sqlite
        finally:
            sqlite.close()
        return
    if not url.startswith(_SCHEMES):
        raise ConfigError(f"database_url must be a postgresql:// URL (got {redact_url(url)!r})")
    from .postgres import PostgresJobStore

    pg = await PostgresJobStore.open(
        url, attempts=settings.database_connect_attempts, retry_s=settings.database_connect_retry_s
    )
    try:
        yield pg
    finally:
        with anyio.CancelScope(shield=True):
            await pg.aclose()
