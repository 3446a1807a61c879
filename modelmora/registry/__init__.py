"""The model registry (what is installed), installation from sources, metadata and versions."""

from pathlib import Path

from ..config import ConfigError
from .active import activate
from .cache import CacheEntry, DownloadCache
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


def open_store(registry_url: str, home: Path) -> ModelStore:
    """Open the registry named by `registry_url` (empty: SQLite under `home`).

    Raises:
        ConfigError: a `registry_url` we cannot open (only `sqlite:///PATH` for now).
        OSError, sqlite3.Error: the file or its folder cannot be created, opened or read.
    """
    if not registry_url:
        return SQLiteStore(home / "registry.sqlite3")
    if registry_url.startswith("sqlite:///"):
        return SQLiteStore(Path(registry_url.removeprefix("sqlite:///")))
    raise ConfigError(
        f"cannot open the registry {registry_url}: unsupported registry_url (only sqlite:///PATH for now)"
    )
