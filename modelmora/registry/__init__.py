"""The model registry (what is installed) and installation from sources."""

from pathlib import Path

from ..config import ConfigError
from .install import TASKS, detect_task, install, parse_source, uninstall
from .store import ModelRecord, ModelStore, SQLiteStore, VersionRecord

__all__ = (
    "TASKS",
    "ModelRecord",
    "ModelStore",
    "SQLiteStore",
    "VersionRecord",
    "detect_task",
    "install",
    "open_store",
    "parse_source",
    "uninstall",
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
