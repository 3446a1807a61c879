"""`modelmora.lock`: the models of a registry pinned (versions, sources, resolved revisions and
a SHA-256 per file), written by `mm lock` and installed exactly by `mm install` (no argument).

The file is TOML, one `[[models]]` table per model (by id) with its `[[models.versions]]`
(in semantic-version order), each with its `[models.versions.files]` (relative path ->
SHA-256). The model's metadata is kept as one JSON string (custom parameters may hold null,
which TOML cannot). A hand-written entry may leave `revision` and `files` out: the next
`mm install` resolves it and writes them back (`--frozen` refuses to).
`schema/modelmora-lock.schema.json` describes the parsed document.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ..config import ModelSettings
from ..errors import InvalidInput
from .metadata import ModelMetadata, validation_error
from .store import ModelRecord
from .versions import SEMVER_RE, semver_key

__all__ = (
    "LOCK_FORMAT",
    "LOCK_NAME",
    "LockFile",
    "LockedModel",
    "LockedVersion",
    "lock_from",
    "read_lock",
    "render_lock",
    "write_lock",
)

LOCK_NAME = "modelmora.lock"
LOCK_FORMAT = 1

_SHA256 = r"^[0-9a-f]{64}$"
_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class LockedVersion(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """One pinned version."""

    version: Annotated[str, Meta(pattern=SEMVER_RE.pattern)]
    revision: str = ""
    """The source's resolved revision (a Hugging Face commit); empty: resolved at install."""
    files: dict[str, Annotated[str, Meta(pattern=_SHA256)]] = {}
    """Relative path -> SHA-256 (hex); empty: not resolved yet."""

    @property
    def resolved(self) -> bool:
        return bool(self.files)


class LockedModel(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """One pinned model."""

    id: Annotated[str, Meta(pattern=_ID)]
    task: str
    source: str
    """Where the files come from: `org/name` (Hugging Face) or `file:///path`."""
    active_version: str
    versions: Annotated[list[LockedVersion], Meta(min_length=1)]
    active_pinned: bool = False
    settings: ModelSettings = ModelSettings()
    metadata: str = ""
    """The model's metadata as JSON (`ModelMetadata`); empty: none."""

    def metadata_struct(self) -> ModelMetadata:
        return msgspec.json.decode(self.metadata, type=ModelMetadata) if self.metadata else ModelMetadata()


class LockFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The whole lock file."""

    lock_version: Annotated[int, Meta(ge=1, le=LOCK_FORMAT)] = LOCK_FORMAT
    models: list[LockedModel] = []


def lock_from(records: list[ModelRecord]) -> LockFile:
    """The lock of a registry's models, as they are installed."""
    models = []
    for rec in sorted(records, key=lambda r: r.id):
        versions = [
            LockedVersion(v.version, v.revision, dict(sorted(v.files.items())))
            for v in sorted(rec.versions, key=lambda v: semver_key(v.version))
        ]
        meta = msgspec.json.encode(rec.metadata).decode() if rec.metadata != ModelMetadata() else ""
        models.append(
            LockedModel(
                rec.id,
                rec.task,
                rec.source,
                rec.active_version,
                versions,
                rec.active_pinned,
                msgspec.convert(rec.settings, ModelSettings),
                meta,
            )
        )
    return LockFile(LOCK_FORMAT, models)


def _str(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; TOML also refuses a raw DEL)."""
    return json.dumps(value).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return _str(str(value))


def render_lock(lock: LockFile) -> str:
    """The TOML text of a lock file."""
    out = [
        "# modelmora.lock: the models of a ModelMora registry, pinned: versions, sources, resolved",
        "# revisions and the SHA-256 of every file. Written by `mm lock`; `mm install` (no argument)",
        "# installs exactly this and checks every checksum.",
        f"lock_version = {lock.lock_version}",
    ]
    for m in lock.models:
        out += ["", "[[models]]", f"id = {_str(m.id)}", f"task = {_str(m.task)}", f"source = {_str(m.source)}"]
        out.append(f"active_version = {_str(m.active_version)}")
        if m.active_pinned:
            out.append("active_pinned = true")
        if m.metadata:
            out.append(f"metadata = {_str(m.metadata)}")
        settings = msgspec.to_builtins(m.settings)
        if settings:
            out += ["", "[models.settings]"] + [f"{k} = {_value(v)}" for k, v in sorted(settings.items())]
        for v in m.versions:
            out += ["", "[[models.versions]]", f"version = {_str(v.version)}"]
            if v.revision:
                out.append(f"revision = {_str(v.revision)}")
            if v.files:
                out += ["", "[models.versions.files]"] + [f"{_str(k)} = {_str(d)}" for k, d in v.files.items()]
    return "\n".join(out) + "\n"


def write_lock(path: Path, lock: LockFile) -> None:
    """Write the lock file (through a temporary file and a rename: never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_lock(lock))
    tmp.replace(path)


def read_lock(path: Path) -> LockFile:
    """Read and validate a lock file.

    Raises:
        InvalidInput: not TOML, or a field is wrong (the message names the file and the field);
            a model listed twice; an active version it does not list.
        OSError: the file cannot be read.
    """
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path} is not valid TOML: {exc}", field="lockfile") from None
    try:
        lock = msgspec.convert(data, LockFile)
    except msgspec.ValidationError as exc:
        err = validation_error(exc, "$")
        raise InvalidInput(f"{path}: {err.message}", field=err.field) from None
    seen: set[str] = set()
    for i, m in enumerate(lock.models):
        where = f"{path}: models[{i}] ({m.id})"
        if m.id in seen:
            raise InvalidInput(f"{where}: the model is listed twice", field=f"$.models[{i}].id")
        seen.add(m.id)
        if m.active_version not in {v.version for v in m.versions}:
            raise InvalidInput(
                f"{where}: active_version {m.active_version} is not one of its versions",
                field=f"$.models[{i}].active_version",
            )
        try:
            m.metadata_struct()
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidInput(f"{where}: metadata: {exc}", field=f"$.models[{i}].metadata") from None
    return lock
