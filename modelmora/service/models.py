"""The models' side of the core: list and look up registered models, change their settings,
delete them, load and unload their versions, and preload them at start.

`InferenceService` takes these methods from `ModelControl`; front ends call them on the service.
Raises only `ModelMoraError`s.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import anyio.to_thread
import msgspec
import structlog

from ..config import ModelSettings, Settings
from ..errors import InvalidInput, ModelMoraError, ModelNotFound, StorageUnavailable
from ..registry import ModelRecord, ModelStore, uninstall
from ..scheduler import ModelRuntime, ModelStatus, Scheduler
from ..security import ANONYMOUS, Identity, audited
from ..tasks import TaskType
from .catalog import Catalog

__all__ = ("ModelControl",)

T = TypeVar("T")

log = structlog.get_logger("modelmora.service")


class ModelControl:
    """The model operations of `InferenceService`, over its registry store, scheduler and catalog."""

    settings: Settings
    store: ModelStore
    scheduler: Scheduler
    catalog: Catalog

    async def models(self, task_type: str | None = None) -> list[ModelRecord]:
        """The registry, optionally of one task type.

        Raises:
            InvalidInput: `task_type` is not a task type.
        """
        if task_type is not None:
            try:
                TaskType(task_type)
            except ValueError:
                raise InvalidInput(
                    f"unknown task type {task_type!r} (expected one of: {', '.join(TaskType)})", field="task_type"
                ) from None
        return await self._registry(self.store.alist(task_type))

    async def cached_model(self, model_id: str) -> ModelRecord:
        """The model's registry record from the request path's short cache (what a front end reads
        to choose a protocol's names for the model's task, or to refuse a task it does not serve).

        Raises:
            ModelNotFound: it is not installed.
        """
        return await self._registry(self.catalog.get(model_id))

    async def model(self, model_id: str) -> ModelRecord:
        rec = await self._registry(self.store.aget(model_id))
        if rec is None:
            raise ModelNotFound(f"model {model_id!r} is not installed")
        return rec

    async def update_settings(
        self, model_id: str, settings: ModelSettings, *, identity: Identity = ANONYMOUS
    ) -> ModelRecord:
        """Replace a model's settings (fields left out take the server's defaults); running
        versions take them at once (device and dtype: their worker is replaced when idle).
        Audited (`identity` names who asked)."""
        changed = msgspec.to_builtins(settings)
        with audited("update_settings", identity, model=model_id, settings=changed):
            return await self._update_settings(model_id, settings)

    async def _update_settings(self, model_id: str, settings: ModelSettings) -> ModelRecord:
        rec = await self._registry(self.store.aupdate_settings(model_id, msgspec.to_builtins(settings)))
        if rec is None:
            raise ModelNotFound(f"model {model_id!r} is not installed")
        self.catalog.forget(model_id)
        for key in list(self.scheduler.models):
            if key.model_id == model_id:
                self.scheduler.runtime_for(rec, key.version)
        return rec

    async def delete(self, model_id: str, *, identity: Identity = ANONYMOUS) -> ModelRecord:
        """Unload every version of a model (queued requests drain first, as with `unload`), then remove
        it from the registry and delete its copied files; returns the removed record. Audited.

        Raises:
            ModelNotFound: it is not installed.
        """
        with audited("delete", identity, model=model_id):
            return await self._delete(model_id)

    async def _delete(self, model_id: str) -> ModelRecord:
        await self.model(model_id)
        for key, rt in list(self.scheduler.models.items()):
            if key.model_id == model_id:
                await self.scheduler.unload(rt, self.settings.unload_grace_s)
        home = self.settings.home_path
        rec = await self._registry(anyio.to_thread.run_sync(uninstall, self.store, home, model_id))
        self.catalog.forget(model_id)
        for key, rt in list(self.scheduler.models.items()):
            if key.model_id == model_id:  # a request that arrived meanwhile: refused, its worker stops
                self.scheduler.remove(rt)
        return rec

    async def _runtime(self, model_id: str, version: str | None) -> ModelRuntime:
        rec = await self.catalog.get(model_id)
        version = version or rec.active_version
        if rec.version_record(version) is None:
            raise ModelNotFound(f"model {model_id!r} has no version {version!r}", field="version")
        return self.scheduler.runtime_for(rec, version)

    async def load(self, model_id: str, version: str | None = None, *, identity: Identity = ANONYMOUS) -> ModelStatus:
        """Load (and warm up) a model version now; returns once it is ready. Audited."""
        with audited("load", identity, model=model_id, version=version):
            rt = await self._runtime(model_id, version)
            await self.scheduler.load(rt, self.settings.worker_start_timeout_s)
            return self._status_of(rt)

    async def unload(self, model_id: str, version: str | None = None, *, identity: Identity = ANONYMOUS) -> ModelStatus:
        """Drain the model's queue, stop its worker, give its memory back. Audited."""
        with audited("unload", identity, model=model_id, version=version):
            rt = await self._runtime(model_id, version)
            await self.scheduler.unload(rt, self.settings.unload_grace_s)
            return self._status_of(rt)

    def _status_of(self, rt: ModelRuntime) -> ModelStatus:
        return next(s for s in self.scheduler.status() if s.model_id == rt.key.model_id and s.version == rt.key.version)

    async def preload(self) -> list[str]:
        """Start loading (without waiting) every model whose settings say `preload`."""
        started = []
        for rec in await self.store.alist():
            if not msgspec.convert(rec.settings, ModelSettings).preload:
                continue
            try:
                rt = self.scheduler.runtime_for(rec)
            except ModelMoraError as exc:
                log.warning("preload_skipped", model=rec.id, reason=exc.message)
                continue
            self.scheduler.request_load(rt)
            started.append(str(rt.key))
        if started:
            log.info("preloading", models=started)
        return started

    @staticmethod
    async def _registry(call: Awaitable[T]) -> T:
        """Await a registry call; a failure other than a `ModelMoraError` is logged and becomes
        `StorageUnavailable`."""
        try:
            return await call
        except ModelMoraError:
            raise
        except Exception as exc:
            log.error("registry_failed", exc_info=exc)
            raise StorageUnavailable("the model registry cannot be read or written now") from None
