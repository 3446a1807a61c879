"""Opening the job store the settings name: `database_url` empty, SQLite under the home; a
`postgresql://` URL, PostgreSQL (asyncio only). And the job streams `redis_url` names (asyncio
only, over a PostgreSQL store)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from ..config import ConfigError, Settings
from .sqlite import SQLiteJobStore
from .store import JobStore

if TYPE_CHECKING:
    from .streams import RedisDispatch

__all__ = ("JOBS_FILE", "check_redis_url", "open_dispatch", "open_job_store", "redact_url")

JOBS_FILE = "jobs.sqlite3"
"""The SQLite job store's file under `$MODELMORA_HOME`."""
_SCHEMES = ("postgresql://", "postgres://")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


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
    check_redis_url(settings)
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


def check_redis_url(settings: Settings) -> None:
    """Refuse a `redis_url` the server cannot use.

    Raises:
        ConfigError: not a Redis URL, or without a PostgreSQL `database_url` (one server owns a
            SQLite store: nothing to share; PostgreSQL already needs the asyncio backend).
    """
    url = settings.redis_url
    if not url:
        return
    if not url.startswith(_REDIS_SCHEMES):
        raise ConfigError(f"redis_url must be a redis:// or rediss:// URL (got {redact_url(url)!r})")
    if not settings.database_url:
        raise ConfigError(
            "redis_url shares jobs between servers sharing a PostgreSQL database_url: set database_url, or leave"
            " redis_url empty"
        )


@asynccontextmanager
async def open_dispatch(settings: Settings, store: JobStore) -> AsyncIterator[RedisDispatch]:
    """The job streams of `redis_url`, their keys under the store's namespace (servers sharing a
    database share them); closed with the context. Nothing is connected yet: Redis may be away."""
    from .streams import RedisDispatch

    namespace = getattr(store, "namespace", "")
    dispatch = RedisDispatch(settings.redis_url, f"modelmora:{namespace or 'jobs'}:", claim_idle_s=settings.job_lease_s)
    try:
        yield dispatch
    finally:
        with anyio.CancelScope(shield=True):
            await dispatch.aclose()
