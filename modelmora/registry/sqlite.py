"""The registry in one SQLite file under `$MODELMORA_HOME` (the embedded default).

Several processes (a running server and the `mm` CLI) share the file safely: WAL mode, a busy
timeout, and a write transaction (`BEGIN IMMEDIATE`) around every change. A file written by an
earlier release is brought up to the current schema when it is opened (`PRAGMA user_version`).
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from ..errors import RegistryError
from .metadata import ModelMetadata
from .store import ModelRecord, ModelStore, VersionRecord

__all__ = ("SCHEMA_VERSION", "SQLiteStore")

SCHEMA_VERSION = 2
"""1: models and versions; 2: a model's metadata, updated_at and a pinned active version."""

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
_ADDED_COLUMNS = (  # schema 2
    ("metadata", "TEXT NOT NULL DEFAULT '{}'"),
    ("updated_at", "REAL NOT NULL DEFAULT 0"),
    ("active_pinned", "INTEGER NOT NULL DEFAULT 0"),
)
_MODEL_COLUMNS = "id, task, source, active_version, settings, created_at, metadata, updated_at, active_pinned"
_metadata_decoder = msgspec.json.Decoder(ModelMetadata)


class SQLiteStore(ModelStore):
    """Registry in one SQLite file; safe to share between the server and the CLI."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        if self._db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        with self._write():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(models)")}
            for name, decl in _ADDED_COLUMNS:
                if name not in have:
                    self._db.execute(f"ALTER TABLE models ADD COLUMN {name} {decl}")
            self._db.execute("UPDATE models SET updated_at = created_at WHERE updated_at = 0")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction (the caller holds no lock; this takes it)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _records(self, rows: builtins.list[tuple[Any, ...]]) -> builtins.list[ModelRecord]:
        out = []
        for mid, task, source, active, settings, created, metadata, updated, pinned in rows:
            vrows = self._db.execute(
                "SELECT version, path, revision, files, size_bytes, created_at FROM versions"
                " WHERE model_id = ? ORDER BY created_at, version",
                (mid,),
            ).fetchall()
            versions = [VersionRecord(v, p, r, json.loads(f), s, c) for v, p, r, f, s, c in vrows]
            out.append(
                ModelRecord(
                    mid,
                    task,
                    source,
                    active,
                    versions,
                    json.loads(settings),
                    created,
                    _metadata_decoder.decode(metadata),
                    updated,
                    bool(pinned),
                )
            )
        return out

    def _get(self, model_id: str) -> ModelRecord | None:
        rows = self._db.execute(f"SELECT {_MODEL_COLUMNS} FROM models WHERE id = ?", (model_id,)).fetchall()
        recs = self._records(rows)
        return recs[0] if recs else None

    def get(self, model_id: str) -> ModelRecord | None:
        with self._lock:
            return self._get(model_id)

    def list(self, task: str | None = None) -> builtins.list[ModelRecord]:
        with self._lock:
            if task is None:
                rows = self._db.execute(f"SELECT {_MODEL_COLUMNS} FROM models ORDER BY id").fetchall()
            else:
                rows = self._db.execute(
                    f"SELECT {_MODEL_COLUMNS} FROM models WHERE task = ? ORDER BY id", (task,)
                ).fetchall()
            return self._records(rows)

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
        with self._write():
            self._db.execute(
                "INSERT INTO models (id, task, source, active_version, created_at, metadata, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                (model_id, task, source, record.version, now, meta, now),
            )
            verb = "INSERT OR REPLACE" if replace else "INSERT"
            try:
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
            except sqlite3.IntegrityError:
                raise RegistryError(
                    f"model {model_id!r} version {record.version} is already installed (use --force to reinstall)"
                ) from None
            self._db.execute("UPDATE models SET updated_at = ? WHERE id = ?", (now, model_id))
            if metadata is not None:
                self._db.execute("UPDATE models SET metadata = ? WHERE id = ?", (meta, model_id))
            if activate:
                self._db.execute("UPDATE models SET active_version = ? WHERE id = ?", (record.version, model_id))
            got = self._get(model_id)
        assert got is not None
        return got

    def remove(self, model_id: str) -> ModelRecord | None:
        with self._write():
            rec = self._get(model_id)
            if rec is not None:
                self._db.execute("DELETE FROM models WHERE id = ?", (model_id,))
        return rec

    def remove_version(self, model_id: str, version: str) -> ModelRecord | None:
        with self._write():
            cur = self._db.execute(
                "DELETE FROM versions WHERE model_id = ? AND version = ?"
                " AND version != (SELECT active_version FROM models WHERE id = ?)",
                (model_id, version, model_id),
            )
            if not cur.rowcount:
                return None
            self._db.execute("UPDATE models SET updated_at = ? WHERE id = ?", (time.time(), model_id))
            return self._get(model_id)

    def set_active(self, model_id: str, version: str, *, pinned: bool | None = None) -> ModelRecord | None:
        with self._write():
            cur = self._db.execute(
                "UPDATE models SET active_version = ?, updated_at = ?,"
                " active_pinned = COALESCE(?, active_pinned) WHERE id = ?"
                " AND EXISTS (SELECT 1 FROM versions WHERE model_id = ? AND version = ?)",
                (version, time.time(), pinned, model_id, model_id, version),
            )
            return self._get(model_id) if cur.rowcount else None

    def _update(self, model_id: str, column: str, value: str) -> ModelRecord | None:
        with self._write():
            cur = self._db.execute(
                f"UPDATE models SET {column} = ?, updated_at = ? WHERE id = ?", (value, time.time(), model_id)
            )
            return self._get(model_id) if cur.rowcount else None

    def update_settings(self, model_id: str, settings: dict[str, Any]) -> ModelRecord | None:
        return self._update(model_id, "settings", json.dumps(settings))

    def update_metadata(self, model_id: str, metadata: ModelMetadata) -> ModelRecord | None:
        return self._update(model_id, "metadata", msgspec.json.encode(metadata).decode())

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
