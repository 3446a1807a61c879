"""The registry side of the core: what front ends may change in the registry while the server
runs (metadata, the active version, deleting), keeping the running models in step.

Every change is written to the registry first; the scheduler then follows it through its
facade (`runtime_for`, `retire`, `remove`, `sync`), as the periodic registry sync would a
moment later. Raises only `ModelMoraError`s.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio.to_thread
import msgspec
import structlog

from ..config import ModelSettings, Settings
from ..errors import InvalidInput, ModelMoraError, ModelNotFound, RegistryError, StorageUnavailable
from ..images import is_public_address
from ..registry import (
    TASKS,
    ModelMetadata,
    ModelRecord,
    ModelStore,
    SourceLimits,
    activate,
    check_version,
    install,
    load_catalog,
    parse_metadata,
    parse_source,
    uninstall,
)
from ..scheduler import Scheduler
from .catalog import Catalog
from .operations import Operation, Operations

__all__ = ("ModelAdmin", "RegisterCall")

T = TypeVar("T")

log = structlog.get_logger("modelmora.service")


class ModelAdmin:
    """Registry operations of the core (`InferenceService.admin`)."""

    def __init__(self, settings: Settings, store: ModelStore, scheduler: Scheduler, catalog: Catalog) -> None:
        self.settings = settings
        self.store = store
        self.scheduler = scheduler
        self.catalog = catalog
        self.operations = Operations()
        """Background installs; runs in the service's task group (`InferenceService.run`)."""

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

    async def register(self, call: RegisterCall) -> Operation:
        """Check a registration at once (422 naming the field, 409 for a version already installed),
        then install it in the background: the operation to poll.

        Local paths are refused (install them with `mm install` on the server's machine); an http(s)
        source whose host resolves to a private, loopback or link-local address is refused unless
        `allow_private_urls`.

        Raises:
            InvalidInput, RegistryError, ModelUnavailable.
        """
        plan = _field(lambda: parse_source(call.source), "$.source")
        if plan.kind == "local":
            raise InvalidInput(
                "local paths are not installed over the API: use mm install on the server's machine, or an"
                " http(s), s3 or Hugging Face source",
                field="$.source",
            )
        if plan.kind == "http" and not self.settings.allow_private_urls:
            private = await _private_host(plan.location)
            if private is not None:
                raise InvalidInput(
                    f"the source's host resolves to {private}, a private or loopback address; set"
                    " allow_private_urls to allow it",
                    field="$.source",
                )
        if call.version is not None:
            _field(lambda: check_version(call.version or ""), "$.version")
        if call.task is not None and call.task not in TASKS:
            raise InvalidInput(f"task_type {call.task!r} is not one of {', '.join(TASKS)}", field="$.task_type")
        if call.metadata is not None:
            parse_metadata(call.metadata, call.task)
        catalog = load_catalog(self.settings.catalog_file)
        entry = catalog.find(call.source)
        model_id = call.model_id or (entry.model_id if entry is not None and plan.kind == "hf" else plan.default_id)
        existing = await _registry(self.store.aget(model_id))
        version = call.version or "1.0.0"
        if existing is not None and existing.version_record(version) is not None and not call.force:
            raise RegistryError(f"model {model_id!r} version {version} is already installed (force to reinstall)")
        home, store, settings = self.settings.home_path, self.store, self.settings

        def work(progress: Callable[[int, int], None]) -> None:
            install(
                store,
                home,
                call.source,
                model_id=model_id,
                task=call.task,
                version=version,
                force=call.force,
                activate=call.activate,
                metadata=call.metadata,
                progress=progress,
                hf_progress=False,
                check_files=call.check_files,
                catalog=catalog,
                limits=SourceLimits.from_settings(settings),
                s3=settings.s3,
            )
            if call.settings is not None:
                store.update_settings(model_id, msgspec.to_builtins(call.settings))
            self.catalog.forget(model_id)

        return self.operations.start("install", model_id, version, work)

    async def download(self, model_id: str, version: str | None = None) -> Operation:
        """Fetch a version's files again from its source, at its recorded revision, in the background;
        the files must match the checksums recorded at install (a repair after files were lost or
        changed).

        Raises:
            ModelNotFound: no such model or version; InvalidInput: a local source.
        """
        rec = await self._model(model_id)
        vrec = rec.version_record(version)
        if vrec is None:
            raise ModelNotFound(f"model {model_id!r} has no version {version!r}", field="version")
        if rec.source.startswith("file://"):
            raise InvalidInput(
                f"model {model_id!r} was installed from a local folder: install it again with mm install"
            )
        home, store, settings = self.settings.home_path, self.store, self.settings

        def work(progress: Callable[[int, int], None]) -> None:
            install(
                store,
                home,
                rec.source,
                model_id=model_id,
                version=vrec.version,
                force=True,
                progress=progress,
                hf_progress=False,
                expect_files=vrec.files,
                revision=vrec.revision or None,
                limits=SourceLimits.from_settings(settings),
                s3=settings.s3,
            )
            self.catalog.forget(model_id)

        return self.operations.start("download", model_id, vrec.version, work)

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


def _field(check: Callable[[], T], field: str) -> T:
    """Run a registry check, naming `field` in the `InvalidInput` it raises."""
    try:
        return check()
    except InvalidInput as exc:
        raise InvalidInput(exc.message, field=field) from None


async def _registry(call: Awaitable[T]) -> T:
    try:
        return await call
    except ModelMoraError:
        raise
    except Exception as exc:
        log.error("registry_failed", exc_info=exc)
        raise StorageUnavailable("the model registry cannot be read or written now") from None


class RegisterCall(msgspec.Struct, frozen=True):
    """Register a model version from a source (what `POST /api/v1/models` asks)."""

    source: str
    model_id: str | None = None
    task: str | None = None
    version: str | None = None
    force: bool = False
    activate: bool = False
    metadata: dict[str, Any] | None = None
    settings: ModelSettings | None = None
    check_files: bool = True


async def _private_host(url: str) -> str | None:
    """The first address of the URL's host that is not public (None when all are)."""
    host = urlsplit(url).hostname or ""
    try:
        infos = await anyio.getaddrinfo(host, None)
    except OSError:
        return None  # the download says it cannot resolve it
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not is_public_address(address):
            return str(address)
    return None
