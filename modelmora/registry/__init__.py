"""The model registry (what is installed), installation from sources, metadata and versions."""

import re
from pathlib import Path

from ..config import ConfigError
from .active import activate
from .cache import CacheEntry, DownloadCache, place
from .catalog import CatalogEntry, CatalogFile, ModelCatalog, load_catalog, merge_metadata
from .checksums import FileVerifier, hash_files, sha256_file
from .install import TASKS, detect_task, install, uninstall
from .locked import LockInstall, install_locked
from .lockfile import LOCK_NAME, LockedModel, LockedVersion, LockFile, lock_from, read_lock, render_lock, write_lock
from .metadata import (
    ModelConfig,
    ModelMetadata,
    ResourceHints,
    check_metadata,
    effective_settings,
    parse_metadata,
    validation_error,
)
from .sources import InstallPlan, Progress, SourceLimits, parse_source, source_url
from .sqlite import SQLiteStore
from .store import ModelRecord, ModelStore, VersionRecord
from .versions import check_version, latest, semver_key, split_ref

__all__ = (
    "LOCK_NAME",
    "TASKS",
    "CacheEntry",
    "CatalogEntry",
    "CatalogFile",
    "DownloadCache",
    "FileVerifier",
    "InstallPlan",
    "LockFile",
    "LockInstall",
    "LockedModel",
    "LockedVersion",
    "ModelCatalog",
    "ModelConfig",
    "ModelMetadata",
    "ModelRecord",
    "ModelStore",
    "ResourceHints",
    "Progress",
    "SQLiteStore",
    "SourceLimits",
    "VersionRecord",
    "activate",
    "check_metadata",
    "check_version",
    "detect_task",
    "effective_settings",
    "hash_files",
    "install",
    "install_locked",
    "latest",
    "load_catalog",
    "lock_from",
    "merge_metadata",
    "open_store",
    "parse_metadata",
    "parse_source",
    "place",
    "read_lock",
    "render_lock",
    "semver_key",
    "sha256_file",
    "source_url",
    "split_ref",
    "uninstall",
    "validation_error",
    "write_lock",
)


def open_store(registry_url: str, home: Path, *, connect_attempts: int = 1, connect_retry_s: float = 1.0) -> ModelStore:
    """Open the registry named by `registry_url`: empty, SQLite under `home`; `sqlite:///PATH`, that
    SQLite file; `postgresql://...` (or `postgres://`), PostgreSQL, which several servers share.

    Args:
        connect_attempts: PostgreSQL: connections tried before an unreachable database is an error.
        connect_retry_s: the wait after the first failed connection, doubled after each later one.

    Raises:
        ConfigError: a `registry_url` of another kind.
        OSError, sqlite3.Error: the SQLite file or its folder cannot be created, opened or read.
        StorageUnavailable: the PostgreSQL database cannot be reached, refuses, or cannot be migrated.
    """
    if not registry_url:
        return SQLiteStore(home / "registry.sqlite3")
    if registry_url.startswith("sqlite:///"):
        return SQLiteStore(Path(registry_url.removeprefix("sqlite:///")))
    if registry_url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore  # asyncpg: imported only when used

        return PostgresStore(registry_url, attempts=connect_attempts, retry_s=connect_retry_s)
    shown = re.sub(r"//[^@/]*@", "//***@", registry_url)  # no credentials in messages
    raise ConfigError(
        f"cannot open the registry {shown}: unsupported registry_url (sqlite:///PATH or postgresql://...)"
    )
