"""The model registry (what is installed) and installation from sources."""

from pathlib import Path

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
    """Open the registry named by `registry_url` (empty: SQLite under `home`)."""
    if not registry_url:
        return SQLiteStore(home / "registry.sqlite3")
    if registry_url.startswith("sqlite:///"):
        return SQLiteStore(Path(registry_url.removeprefix("sqlite:///")))
    raise ValueError(f"unsupported registry_url {registry_url!r} (only sqlite:///PATH for now)")
