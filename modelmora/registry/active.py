"""Choosing a model's active version: the one requests without a version go to."""

from __future__ import annotations

from ..errors import ModelNotFound
from .checksums import FileVerifier
from .store import ModelRecord, ModelStore
from .versions import check_version

__all__ = ("activate",)


def activate(
    store: ModelStore,
    model_id: str,
    version: str,
    *,
    pin: bool | None = None,
    verifier: FileVerifier | None = None,
) -> tuple[ModelRecord, ModelRecord]:
    """Make `version` the active one (and pin or unpin it; None: unchanged), once its files match
    the checksums recorded at install: a changed file never becomes active.

    Returns:
        The model before and after.

    Raises:
        InvalidInput: `version` is not a semantic version.
        ModelNotFound: no such model or version.
        ChecksumMismatch: a file of the version is missing or changed (nothing is changed).
    """
    check_version(version)
    rec = store.get(model_id)
    if rec is None:
        raise ModelNotFound(f"model {model_id!r} is not installed")
    vrec = rec.version_record(version)
    if vrec is None:
        have = ", ".join(v.version for v in rec.versions)
        raise ModelNotFound(f"model {model_id!r} has no version {version} (installed: {have})", field="version")
    (verifier or FileVerifier()).verify(vrec.path, vrec.files, what=f"model {model_id!r} version {version}")
    new = store.set_active(model_id, version, pinned=pin)
    if new is None:  # removed by another process meanwhile
        raise ModelNotFound(f"model {model_id!r} has no version {version}", field="version")
    return rec, new
