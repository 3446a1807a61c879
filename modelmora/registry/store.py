"""The model registry: what is installed, in which versions, from where.

One interface (`ModelStore`), backed here by SQLite (the embedded default, a file under
`$MODELMORA_HOME`). Calls are synchronous (the CLI uses them directly); the server calls
the `a*` variants, which run the same code in a worker thread through anyio so that the
event loop never blocks (works on asyncio and trio). Several processes (a running server
and the `mm` CLI) share the file safely: WAL mode and a busy timeout.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec

__all__ = ("ModelRecord", "ModelStore", "SQLiteStore", "VersionRecord")


class VersionRecord(msgspec.Struct, frozen=True):
    """One installed version of a model: where its files are and their checksums."""

    version: str
    path: str
    revision: str = ""
    files: dict[str, str] = {}
    """Relative path -> SHA-256 hex."""
    size_bytes: int = 0
    created_at: float = 0.0


class ModelRecord(msgspec.Struct, frozen=True):
    """A registered model with all its versions."""

    id: str
    task: str
    source: str
    active_version: str
    versions: list[VersionRecord]
    settings: dict[str, Any] = {}
    created_at: float = 0.0

    def version_record(self, version: str | None = None) -> VersionRecord | None:
        wanted = version or self.active_version
        return next((v for v in self.versions if v.version == wanted), None)


class ModelStore:
    """Interface of a registry backend."""

    def get(self, model_id: str) -> ModelRecord | None:
        raise NotImplementedError

    def list(self, task: str | None = None) -> builtins.list[ModelRecord]:
        raise NotImplementedError

    def add_version(
        self, model_id: str, task: str, source: str, record: VersionRecord, *, replace: bool = False
    ) -> ModelRecord:
        raise NotImplementedError

    def remove(self, model_id: str) -> ModelRecord | None:
        raise NotImplementedError

    def update_settings(self, model_id: str, settings: dict[str, Any]) -> ModelRecord | None:
        """Replace a model's per-model settings; None when the model does not exist."""
        raise NotImplementedError

    def ping(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    async def aget(self, model_id: str) -> ModelRecord | None:
        return await anyio.to_thread.run_sync(self.get, model_id)

    async def alist(self, task: str | None = None) -> builtins.list[ModelRecord]:
        return await anyio.to_thread.run_sync(self.list, task)

    async def aupdate_settings(self, model_id: str, settings: dict[str, Any]) -> ModelRecord | None:
        return await anyio.to_thread.run_sync(self.update_settings, model_id, settings)

    async def aping(self) -> None:
        await anyio.to_thread.run_sync(self.ping)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    source TEXT NOT NULL,
    active_version TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    version TEXT NOT NULL,
    path TEXT NOT NULL,
    revision TEXT NOT NULL DEFAULT '',
    files TEXT NOT NULL DEFAULT '{}',
    size_bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    PRIMARY KEY (model_id, version)
);
"""


class SQLiteStore(ModelStore):
    """Registry in one SQLite file; safe to share between the server and the CLI."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def _records(self, rows: builtins.list[tuple[Any, ...]]) -> builtins.list[ModelRecord]:
        out = []
        for mid, task, source, active, settings, created in rows:
            vrows = self._db.execute(
                "SELECT version, path, revision, files, size_bytes, created_at FROM versions"
                " WHERE model_id = ? ORDER BY created_at",
                (mid,),
            ).fetchall()
            versions = [VersionRecord(v, p, r, json.loads(f), s, c) for v, p, r, f, s, c in vrows]
            out.append(ModelRecord(mid, task, source, active, versions, json.loads(settings), created))
        return out

    def get(self, model_id: str) -> ModelRecord | None:
        with self._lock:
            rows = self._db.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchall()
            recs = self._records(rows)
        return recs[0] if recs else None

    def list(self, task: str | None = None) -> builtins.list[ModelRecord]:
        with self._lock:
            if task is None:
                rows = self._db.execute("SELECT * FROM models ORDER BY id").fetchall()
            else:
                rows = self._db.execute("SELECT * FROM models WHERE task = ? ORDER BY id", (task,)).fetchall()
            return self._records(rows)

    def add_version(
        self, model_id: str, task: str, source: str, record: VersionRecord, *, replace: bool = False
    ) -> ModelRecord:
        """Insert a model (first version) or add a version; `replace` overwrites that version.

        The first version becomes the active one; later versions do not change it.
        """
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO models (id, task, source, active_version, created_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT(id) DO NOTHING",
                    (model_id, task, source, record.version, now),
                )
                verb = "INSERT OR REPLACE" if replace else "INSERT"
                self._db.execute(
                    f"{verb} INTO versions (model_id, version, path, revision, files, size_bytes, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        model_id,
                        record.version,
                        record.path,
                        record.revision,
                        json.dumps(record.files),
                        record.size_bytes,
                        record.created_at or now,
                    ),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        got = self.get(model_id)
        assert got is not None
        return got

    def remove(self, model_id: str) -> ModelRecord | None:
        rec = self.get(model_id)
        if rec is None:
            return None
        with self._lock:
            self._db.execute("DELETE FROM models WHERE id = ?", (model_id,))
        return rec

    def update_settings(self, model_id: str, settings: dict[str, Any]) -> ModelRecord | None:
        with self._lock:
            cur = self._db.execute("UPDATE models SET settings = ? WHERE id = ?", (json.dumps(settings), model_id))
        return self.get(model_id) if cur.rowcount else None

    def ping(self) -> None:
        """Raise unless the registry can be read and written: a write transaction is begun and
        rolled back (nothing is written). A database busy with another writer counts as writable."""
        with self._lock:
            self._db.execute("SELECT 1").fetchone()
            self._db.execute("PRAGMA busy_timeout = 100")
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                    raise
            else:
                self._db.execute("ROLLBACK")
            finally:
                self._db.execute("PRAGMA busy_timeout = 30000")

    def close(self) -> None:
        with self._lock:
            self._db.close()
