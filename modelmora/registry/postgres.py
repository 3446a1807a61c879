"""The registry in PostgreSQL (`registry_url = "postgresql://..."`): several servers and the `mm`
CLI share one registry.

asyncpg runs on asyncio only, and `ModelStore` is synchronous (the CLI and install threads call it;
the server's `a*` calls run it in a worker thread). So the store owns a private asyncio loop in a
daemon thread, where its connection pool lives, and each method submits its queries there and
waits: the store works from any thread, under either server backend (asyncio or trio).

The promises are the SQLite store's: every change is one transaction, conditional on the state it
leaves (a version is removed only while it is not the active one). The schema is versioned in the
`modelmora_schema` table (row `registry`; the job store keeps its own row there, so both may share
one database): `PG_MIGRATIONS[n]` takes version n to n + 1, applied at open under an advisory lock
(servers starting together migrate once).
"""

from __future__ import annotations

import asyncio
import builtins
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import asyncpg
import msgspec

from ..errors import RegistryError, StorageUnavailable
from .metadata import ModelMetadata
from .store import ModelRecord, ModelStore, VersionRecord

__all__ = ("PG_MIGRATIONS", "PG_SCHEMA_VERSION", "PostgresStore")

T = TypeVar("T")

PG_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE mm_models (
        id TEXT PRIMARY KEY,
        task TEXT NOT NULL,
        source TEXT NOT NULL,
        active_version TEXT NOT NULL,
        active_pinned BOOLEAN NOT NULL DEFAULT FALSE,
        settings JSON NOT NULL DEFAULT '{}',
        metadata JSON NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX mm_models_task ON mm_models (task);
    CREATE TABLE mm_model_versions (
        model_id TEXT NOT NULL REFERENCES mm_models(id) ON DELETE CASCADE,
        version TEXT NOT NULL,
        path TEXT NOT NULL,
        revision TEXT NOT NULL DEFAULT '',
        files JSON NOT NULL DEFAULT '{}',
        size_bytes BIGINT NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (model_id, version)
    );
    """,
)
"""`PG_MIGRATIONS[n]` takes the registry schema from version n to n + 1 (append; never edit a
shipped one). JSON (not JSONB) columns keep objects in their order, as the SQLite store does."""
PG_SCHEMA_VERSION = len(PG_MIGRATIONS)
_LOCK_ID = 0x6D6D726567  # the advisory lock migrations run under
_MODEL_COLUMNS = "id, task, source, active_version, settings, created_at, metadata, updated_at, active_pinned"
_VERSION_COLUMNS = "model_id, version, path, revision, files, size_bytes, created_at"
# A connection the server closed (a restart, pg_terminate_backend) fails the call that finds it
# (asyncpg's pool then replaces it). SQLSTATE classes of a database that cannot serve now:
# connection (08), insufficient resources (53), operator intervention (57); read-only transaction
# (25006), missing privilege (42501).
_UNAVAILABLE = re.compile(r"^(08|53|57)|^25006$|^42501$")
_metadata_decoder = msgspec.json.Decoder(ModelMetadata)


def _redact(url: str) -> str:
    """`url` with its user and password hidden, for messages."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)):
        return True
    return isinstance(exc, asyncpg.PostgresError) and bool(_UNAVAILABLE.match(str(exc.sqlstate or "")))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class _Loop:
    """An asyncio loop in a daemon thread (a store never closed does not keep the process alive)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mm-registry-pg", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("the registry's own loop cannot wait for itself")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class PostgresStore(ModelStore):
    """The registry in PostgreSQL (see the module's docstring).

    Raises (at construction):
        StorageUnavailable: the database cannot be reached (after `attempts` tries, `retry_s` apart
            and doubled each time), refuses the connection, or cannot be migrated; the message names
            the URL without its credentials.
    """

    def __init__(self, url: str, *, attempts: int = 1, retry_s: float = 1.0) -> None:
        self.url = url
        self._where = _redact(url)
        self._loop = _Loop()
        try:
            self._pool: Any = self._loop.run(self._open(attempts, retry_s))
        except Exception as exc:
            self._loop.stop()
            raise StorageUnavailable(f"cannot open the registry {self._where}: {_reason(exc)}") from None

    async def _open(self, attempts: int, retry_s: float) -> Any:
        for attempt in range(1, attempts + 1):
            try:
                pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4)
                break
            except (OSError, asyncpg.CannotConnectNowError):
                if attempt >= attempts:
                    raise
                await asyncio.sleep(retry_s * 2 ** (attempt - 1))
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS modelmora_schema (name TEXT PRIMARY KEY, version INTEGER)"
                )
                have = await conn.fetchval("SELECT version FROM modelmora_schema WHERE name = 'registry'") or 0
                for script in PG_MIGRATIONS[have:]:
                    await conn.execute(script)
                await conn.execute(
                    "INSERT INTO modelmora_schema (name, version) VALUES ('registry', $1)"
                    " ON CONFLICT (name) DO UPDATE SET version = GREATEST(modelmora_schema.version, EXCLUDED.version)",
                    PG_SCHEMA_VERSION,
                )
        except BaseException:
            await pool.close()
            raise
        return pool

    def _run(self, fn: Callable[[Any], Awaitable[T]], *, write: bool = False) -> T:
        """`fn(connection)` on the store's loop (in one transaction when `write`).

        Raises:
            StorageUnavailable: the database cannot be reached or written now.
        """

        async def call() -> T:
            async with self._pool.acquire() as conn:
                if not write:
                    return await fn(conn)
                async with conn.transaction():
                    return await fn(conn)

        try:
            return self._loop.run(call())
        except Exception as exc:
            if not _unavailable(exc):
                raise
            raise StorageUnavailable(
                f"the registry {self._where} cannot be read or written now: {_reason(exc)}"
            ) from None

    @staticmethod
    async def _records(conn: Any, rows: builtins.list[Any]) -> builtins.list[ModelRecord]:
        if not rows:
            return []
        vrows = await conn.fetch(
            f"SELECT {_VERSION_COLUMNS} FROM mm_model_versions WHERE model_id = ANY($1::text[])"
            ' ORDER BY created_at, version COLLATE "C"',
            [r["id"] for r in rows],
        )
        versions: dict[str, builtins.list[VersionRecord]] = {}
        for v in vrows:
            versions.setdefault(v["model_id"], []).append(
                VersionRecord(
                    v["version"], v["path"], v["revision"], json.loads(v["files"]), v["size_bytes"], v["created_at"]
                )
            )
        return [
            ModelRecord(
                r["id"],
                r["task"],
                r["source"],
                r["active_version"],
                versions.get(r["id"], []),
                json.loads(r["settings"]),
                r["created_at"],
                _metadata_decoder.decode(r["metadata"]),
                r["updated_at"],
                r["active_pinned"],
            )
            for r in rows
        ]

    async def _get(self, conn: Any, model_id: str) -> ModelRecord | None:
        rows = await conn.fetch(f"SELECT {_MODEL_COLUMNS} FROM mm_models WHERE id = $1", model_id)
        recs = await self._records(conn, rows)
        return recs[0] if recs else None

    def get(self, model_id: str) -> ModelRecord | None:
        return self._run(lambda conn: self._get(conn, model_id))

    def list(self, task: str | None = None) -> builtins.list[ModelRecord]:
        async def run(conn: Any) -> builtins.list[ModelRecord]:
            where = "" if task is None else "WHERE task = $1"
            rows = await conn.fetch(
                f'SELECT {_MODEL_COLUMNS} FROM mm_models {where} ORDER BY id COLLATE "C"',
                *(() if task is None else (task,)),
            )
            return await self._records(conn, rows)

        return self._run(run)

    def add_version(
        self,
        model_id: str,
        task: str,
        source: str,
        record: VersionRecord,
        *,
        replace: bool = False,
        metadata: ModelMetadata | None = None,
        activate: bool = False,
    ) -> ModelRecord:
        now = time.time()
        meta = msgspec.json.encode(metadata if metadata is not None else ModelMetadata()).decode()
        row = (model_id, record.version, record.path, record.revision, json.dumps(record.files), record.size_bytes)

        async def run(conn: Any) -> ModelRecord:
            await conn.execute(
                "INSERT INTO mm_models (id, task, source, active_version, created_at, metadata, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $5) ON CONFLICT (id) DO NOTHING",
                model_id,
                task,
                source,
                record.version,
                now,
                meta,
            )
            upsert = (
                " ON CONFLICT (model_id, version) DO UPDATE SET path = EXCLUDED.path, revision = EXCLUDED.revision,"
                " files = EXCLUDED.files, size_bytes = EXCLUDED.size_bytes, created_at = EXCLUDED.created_at"
            )
            try:
                await conn.execute(
                    f"INSERT INTO mm_model_versions ({_VERSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                    + (upsert if replace else ""),
                    *row,
                    record.created_at or now,
                )
            except asyncpg.UniqueViolationError:
                raise RegistryError(
                    f"model {model_id!r} version {record.version} is already installed (use --force to reinstall)"
                ) from None
            await conn.execute(
                "UPDATE mm_models SET updated_at = $2,"
                " metadata = CASE WHEN $3 THEN $4::json ELSE metadata END,"
                " active_version = CASE WHEN $5 THEN $6 ELSE active_version END WHERE id = $1",
                model_id,
                now,
                metadata is not None,
                meta,
                activate,
                record.version,
            )
            got = await self._get(conn, model_id)
            assert got is not None
            return got

        return self._run(run, write=True)

    def remove(self, model_id: str) -> ModelRecord | None:
        async def run(conn: Any) -> ModelRecord | None:
            await conn.execute("SELECT 1 FROM mm_models WHERE id = $1 FOR UPDATE", model_id)
            rec = await self._get(conn, model_id)
            if rec is not None:
                await conn.execute("DELETE FROM mm_models WHERE id = $1", model_id)
            return rec

        return self._run(run, write=True)

    def remove_version(self, model_id: str, version: str) -> ModelRecord | None:
        async def run(conn: Any) -> ModelRecord | None:
            status = await conn.execute(
                "DELETE FROM mm_model_versions v USING mm_models m WHERE v.model_id = $1 AND v.version = $2"
                " AND m.id = v.model_id AND m.active_version != v.version",
                model_id,
                version,
            )
            if status.endswith(" 0"):
                return None
            await conn.execute("UPDATE mm_models SET updated_at = $2 WHERE id = $1", model_id, time.time())
            return await self._get(conn, model_id)

        return self._run(run, write=True)

    def set_active(self, model_id: str, version: str, *, pinned: bool | None = None) -> ModelRecord | None:
        async def run(conn: Any) -> ModelRecord | None:
            status = await conn.execute(
                "UPDATE mm_models SET active_version = $2, updated_at = $3,"
                " active_pinned = COALESCE($4::boolean, active_pinned) WHERE id = $1"
                " AND EXISTS (SELECT 1 FROM mm_model_versions WHERE model_id = $1 AND version = $2)",
                model_id,
                version,
                time.time(),
                pinned,
            )
            return None if status.endswith(" 0") else await self._get(conn, model_id)

        return self._run(run, write=True)

    def _update(self, model_id: str, column: str, value: str) -> ModelRecord | None:
        async def run(conn: Any) -> ModelRecord | None:
            status = await conn.execute(
                f"UPDATE mm_models SET {column} = $2::json, updated_at = $3 WHERE id = $1", model_id, value, time.time()
            )
            return None if status.endswith(" 0") else await self._get(conn, model_id)

        return self._run(run, write=True)

    def update_settings(self, model_id: str, settings: dict[str, Any]) -> ModelRecord | None:
        return self._update(model_id, "settings", json.dumps(settings))

    def update_metadata(self, model_id: str, metadata: ModelMetadata) -> ModelRecord | None:
        return self._update(model_id, "metadata", msgspec.json.encode(metadata).decode())

    def ping(self) -> None:
        """Raise unless the registry can be read and written: its tables answer, and the
        connection is not read-only (a standby, or `default_transaction_read_only`)."""

        async def run(conn: Any) -> None:
            await conn.fetchval("SELECT count(*) FROM (SELECT 1 FROM mm_models LIMIT 1) AS one")
            if await conn.fetchval("SELECT current_setting('transaction_read_only')") == "on":
                raise StorageUnavailable(f"the registry {self._where} is read-only")

        self._run(run)

    def close(self) -> None:
        if not self._loop.thread.is_alive():
            return
        try:
            self._loop.run(self._pool.close())
        finally:
            self._loop.stop()
