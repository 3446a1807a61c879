"""The model registry's records and its one interface, `ModelStore`: what is installed, in which
versions, from where, with which metadata and settings.

Backends (SQLite, `sqlite.py`; PostgreSQL, `postgres.py`) implement the synchronous methods; the
CLI calls them directly, the server calls the `a*` variants, which run the same code in a worker
thread through anyio, so that the event loop never blocks (works on asyncio and trio). A backend
may override the `a*` variants with native async calls.
"""

from __future__ import annotations

import builtins
from typing import Any

import anyio.to_thread
import msgspec

from .metadata import ModelMetadata

__all__ = ("ModelRecord", "ModelStore", "VersionRecord")


class VersionRecord(msgspec.Struct, frozen=True):
    """One installed version of a model: where its files are and their checksums."""

    version: str
    path: str
    revision: str = ""
    """The resolved revision of the source (a Hugging Face commit, an archive's SHA-256...)."""
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
    metadata: ModelMetadata = ModelMetadata()
    updated_at: float = 0.0
    active_pinned: bool = False
    """The active version is pinned: installing a version with `activate` does not move it (an
    explicit activation does)."""

    def version_record(self, version: str | None = None) -> VersionRecord | None:
        wanted = version or self.active_version
        return next((v for v in self.versions if v.version == wanted), None)


class ModelStore:
    """Interface of a registry backend. Every method that changes a model sets its `updated_at`."""

    def get(self, model_id: str) -> ModelRecord | None:
        raise NotImplementedError

    def list(self, task: str | None = None) -> builtins.list[ModelRecord]:
        """Every model (of one task type), by id."""
        raise NotImplementedError

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
        """Insert a model (its first version becomes the active one) or add a version to it.

        Args:
            replace: overwrite that version if it exists (else `RegistryError`).
            metadata: the model's metadata (None: an existing model keeps its own).
            activate: the new version becomes the active one.
        """
        raise NotImplementedError

    def remove(self, model_id: str) -> ModelRecord | None:
        """Remove a model and all its versions; the record as it was, None when there was none."""
        raise NotImplementedError

    def remove_version(self, model_id: str, version: str) -> ModelRecord | None:
        """Remove one version (never the active one: callers activate another first); the model
        as it is now, None when the model or version does not exist."""
        raise NotImplementedError

    def set_active(self, model_id: str, version: str, *, pinned: bool | None = None) -> ModelRecord | None:
        """Make `version` the active one (and pin or unpin it; None: unchanged); None when the
        model or version does not exist."""
        raise NotImplementedError

    def update_settings(self, model_id: str, settings: dict[str, Any]) -> ModelRecord | None:
        """Replace a model's per-model settings; None when the model does not exist."""
        raise NotImplementedError

    def update_metadata(self, model_id: str, metadata: ModelMetadata) -> ModelRecord | None:
        """Replace a model's metadata; None when the model does not exist."""
        raise NotImplementedError

    def ping(self) -> None:
        """Raise unless the registry can be read and written."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    async def aget(self, model_id: str) -> ModelRecord | None:
        return await anyio.to_thread.run_sync(self.get, model_id)

    async def alist(self, task: str | None = None) -> builtins.list[ModelRecord]:
        return await anyio.to_thread.run_sync(self.list, task)

    async def aremove(self, model_id: str) -> ModelRecord | None:
        return await anyio.to_thread.run_sync(self.remove, model_id)

    async def aset_active(self, model_id: str, version: str, *, pinned: bool | None = None) -> ModelRecord | None:
        return await anyio.to_thread.run_sync(lambda: self.set_active(model_id, version, pinned=pinned))

    async def aupdate_settings(self, model_id: str, settings: dict[str, Any]) -> ModelRecord | None:
        return await anyio.to_thread.run_sync(self.update_settings, model_id, settings)

    async def aupdate_metadata(self, model_id: str, metadata: ModelMetadata) -> ModelRecord | None:
        return await anyio.to_thread.run_sync(self.update_metadata, model_id, metadata)

    async def aping(self) -> None:
        await anyio.to_thread.run_sync(self.ping)
