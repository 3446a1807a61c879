"""Installing exactly what a lock file pins (`mm install` with no argument)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from ..config import S3Settings
from ..errors import InvalidInput, RegistryError
from .checksums import FileVerifier
from .install import install
from .lockfile import LockedModel, LockedVersion, LockFile
from .sources import Progress, SourceLimits
from .store import ModelStore

__all__ = ("LockInstall", "install_locked")


@dataclass
class LockInstall:
    """What `install_locked` did."""

    lock: LockFile
    """The lock, with the entries it resolved (the same as given when nothing was resolved)."""
    installed: list[str] = field(default_factory=list)
    """`id@version` installed from their sources."""
    verified: list[str] = field(default_factory=list)
    """`id@version` already installed, whose files were checked against the lock."""
    resolved: list[str] = field(default_factory=list)
    """`id@version` the lock gave no checksums for: now pinned."""
    changed: list[str] = field(default_factory=list)
    """`id`s whose active version, settings or metadata were set as the lock says."""

    @property
    def lock_changed(self) -> bool:
        return bool(self.resolved)


def install_locked(
    store: ModelStore,
    home: Path,
    lock: LockFile,
    *,
    frozen: bool = False,
    force: bool = False,
    verifier: FileVerifier | None = None,
    progress_for: Callable[[str], Progress | None] | None = None,
    check_files: bool = True,
    limits: SourceLimits | None = None,
    s3: S3Settings | None = None,
) -> LockInstall:
    """Install every version `lock` pins, check every checksum, and set each model's active
    version, pin, settings and metadata as the lock says.

    A version already installed must have exactly the lock's files and checksums (they are
    checked on disk too); one that is not is installed from its source at its pinned revision,
    and refused, before it is registered, if any file differs. An entry without checksums is
    resolved (installed, or taken from the registry) and returned in the new lock, unless
    `frozen`.

    Args:
        force: reinstall a version whose installed files differ from the lock's.
        progress_for: a progress callback for the install of `id@version` (or None).

    Raises:
        InvalidInput: with `frozen`, an entry the lock does not resolve.
        ChecksumMismatch: a file differs from the lock (the message names it).
        RegistryError: the id is used by another source; a version is installed with other files
            than the lock pins (without `force`); the source resolved another revision.
    """
    verifier = verifier or FileVerifier()
    result = LockInstall(lock)
    models: list[LockedModel] = []
    for model in lock.models:
        versions: list[LockedVersion] = []
        for v in model.versions:
            ref = f"{model.id}@{v.version}"
            if frozen and not v.resolved:
                raise InvalidInput(
                    f"the lock gives no checksums for {ref}: run mm install without --frozen to resolve it",
                    field="lockfile",
                )
            rec = store.get(model.id)
            vrec = rec.version_record(v.version) if rec is not None else None
            if rec is not None and rec.source != model.source:
                raise RegistryError(
                    f"model id {model.id!r} is installed from {rec.source}; the lock pins {model.source}"
                )
            if vrec is not None and (not v.resolved or vrec.files == v.files):
                verifier.verify(vrec.path, vrec.files, what=f"model {model.id!r} version {v.version}")
                result.verified.append(ref)
                if not v.resolved:
                    result.resolved.append(ref)
                    v = LockedVersion(v.version, vrec.revision, dict(sorted(vrec.files.items())))
                versions.append(v)
                continue
            if vrec is not None and not force:
                differ = sorted(n for n in v.files.keys() | vrec.files.keys() if v.files.get(n) != vrec.files.get(n))
                raise RegistryError(
                    f"{ref} is installed with other files than the lock pins ({', '.join(differ[:3])}):"
                    " reinstall it from the lock with --force, or write the lock again with mm lock"
                )
            new = install(
                store,
                home,
                model.source,
                model_id=model.id,
                task=model.task,
                version=v.version,
                force=vrec is not None,
                metadata=model.metadata_struct() if rec is None else None,
                progress=progress_for(ref) if progress_for is not None else None,
                hf_progress=False,
                check_files=check_files,
                expect_files=v.files if v.resolved else None,
                revision=v.revision or None,
                limits=limits,
                s3=s3,
            )
            installed = new.version_record(v.version)
            assert installed is not None
            result.installed.append(ref)
            if not v.resolved:
                result.resolved.append(ref)
                v = LockedVersion(v.version, installed.revision, dict(sorted(installed.files.items())))
            elif v.revision and installed.revision and installed.revision != v.revision:
                raise RegistryError(f"{ref}: the source gave revision {installed.revision}, the lock pins {v.revision}")
            versions.append(v)
        models.append(msgspec.structs.replace(model, versions=versions))
        _apply(store, model, result)
    result.lock = msgspec.structs.replace(lock, models=models)
    return result


def _apply(store: ModelStore, model: LockedModel, result: LockInstall) -> None:
    """Set the active version, pin, settings and metadata the lock gives (where they differ)."""
    rec = store.get(model.id)
    assert rec is not None
    changed = False
    if rec.active_version != model.active_version or rec.active_pinned != model.active_pinned:
        store.set_active(model.id, model.active_version, pinned=model.active_pinned)
        changed = True
    settings = msgspec.to_builtins(model.settings)
    if rec.settings != settings:
        store.update_settings(model.id, settings)
        changed = True
    meta = model.metadata_struct()
    if model.metadata and rec.metadata != meta:
        store.update_metadata(model.id, meta)
        changed = True
    if changed:
        result.changed.append(model.id)
