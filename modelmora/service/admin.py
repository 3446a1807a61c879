"""The registry side of the core: what front ends may change in the registry while the server
runs (metadata, the active version, deleting), keeping the running models in step.

Every change is written to the registry first; the scheduler then follows it through its
facade (`runtime_for`, `retire`, `remove`, `sync`), as the periodic registry sync would a
moment later. Raises only `ModelMoraError`s.
"""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import structlog

from ..config import Settings
from ..errors import ModelMoraError, ModelNotFound, RegistryError, StorageUnavailable
from ..registry import ModelMetadata, ModelRecord, ModelStore, activate, parse_metadata, uninstall
from ..scheduler import Scheduler
from .catalog import Catalog

__all__ = ("ModelAdmin",)

T = TypeVar("T")

log = structlog.get_logger("modelmora.service")


class ModelAdmin:
    """Registry operations of the core (`InferenceService.admin`)."""

    def __init__(self, settings: Settings, store: ModelStore, scheduler: Scheduler, catalog: Catalog) -> None:
        self.settings = settings
        self.store = store
        self.scheduler = scheduler
        self.catalog = catalog

    async def _model(self, model_id: str) -> ModelRecord:
        rec = await _registry(self.store.aget(model_id))
        if rec is None:
            raise ModelNotFound(f"model {model_id!r} is not installed")
        return rec

    def _follow(self, rec: ModelRecord) -> None:
        """Bring the running versions of the model up to date with its record now."""
        self.catalog.forget(rec.id)
        self.scheduler.sync_model(rec)

    async def update_metadata(self, model_id: str, metadata: Any) -> ModelRecord:
        """Replace a model's metadata (`ModelMetadata` or decoded JSON, validated for its task).

        Raises:
            ModelNotFound: no such model.
            InvalidInput: a field is wrong; `field` names it (`$.config.vector_size`).
        """
        rec = await self._model(model_id)
        meta: ModelMetadata = parse_metadata(metadata, rec.task, prefix="$")
        new = await _registry(self.store.aupdate_metadata(model_id, meta))
        if new is None:
            raise ModelNotFound(f"model {model_id!r} is not installed")
        self._follow(new)
        return new

    async def activate(self, model_id: str, version: str, *, pin: bool | None = None) -> ModelRecord:
        """Make `version` the active one (and pin or unpin it), once its files match their recorded
        checksums. New requests without a version go to it at once; the previous version's worker
        serves what it holds, then stops.

        Raises:
            InvalidInput: not a semantic version.
            ModelNotFound: no such model or version.
            ChecksumMismatch: a file of the version changed (409; the active version stays).
        """
        verifier = self.scheduler.verifier
        old, new = await _registry(
            anyio.to_thread.run_sync(lambda: activate(self.store, model_id, version, pin=pin, verifier=verifier))
        )
        log.info(
            "model_activated", model=model_id, version=version, previous=old.active_version, pinned=new.active_pinned
        )
        self._follow(new)
        return new

    async def delete(self, model_id: str, version: str | None = None, *, force: bool = False) -> ModelRecord:
        """Remove a model (or one version that is not the active one) and its files. A version whose
        worker is running is refused unless `force`: then it is unloaded first (its queue drained
        within `unload_grace_s`).

        Raises:
            ModelNotFound: no such model or version.
            RegistryError: a version is loaded or busy and `force` is not set; the version is the
                active one while others remain.
        """
        rec = await self._model(model_id)
        if version is not None and rec.version_record(version) is None:
            raise ModelNotFound(f"model {model_id!r} has no version {version!r}", field="version")
        busy = [rt for rt in self.scheduler.runtimes_of(model_id, version) if rt.in_use]
        if busy and not force:
            which = ", ".join(rt.key.version for rt in busy)
            raise RegistryError(
                f"model {model_id!r} is loaded (version {which}): unload it first, or delete with force"
                " (it is unloaded, its queued requests served, then removed)"
            )
        for rt in busy:
            await self.scheduler.unload(rt, self.settings.unload_grace_s)
        home: Path = self.settings.home_path
        try:
            removed = await anyio.to_thread.run_sync(lambda: uninstall(self.store, home, model_id, version))
        except ModelMoraError:
            raise
        except Exception as exc:
            log.error("registry_failed", exc_info=exc)
            raise StorageUnavailable("the model registry cannot be read or written now") from None
        self.catalog.forget(model_id)
        after = await _registry(self.store.aget(model_id))
        self.scheduler.sync_model(after, model_id=model_id)
        return removed


async def _registry(call: Awaitable[T]) -> T:
    try:
        return await call
    except ModelMoraError:
        raise
    except Exception as exc:
        log.error("registry_failed", exc_info=exc)
        raise StorageUnavailable("the model registry cannot be read or written now") from None
