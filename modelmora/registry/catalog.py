"""The model catalog: known models with their task type, vector dimension and defaults, so that
installing one needs no flags.

The curated catalog ships with ModelMora (`catalog.toml` beside this module); a user catalog
file in the same format (the `catalog_file` setting) adds entries and overrides shipped ones of
the same source. An entry is found by its Hugging Face repo (`org/name`, any case) or by its
model id (`name`, or the entry's `id`).
"""

from __future__ import annotations

import functools
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ..config import ConfigError, ModelSettings
from ..tasks import TaskType
from .metadata import ModelMetadata, check_metadata, validation_error

__all__ = ("CATALOG_FORMAT", "CatalogEntry", "CatalogFile", "ModelCatalog", "load_catalog", "merge_metadata")

CATALOG_FORMAT = 1
_REPO = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class CatalogEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """One known model."""

    source: Annotated[str, Meta(pattern=_REPO, description="The Hugging Face repo, org/name")]
    task: TaskType
    id: Annotated[str, Meta(pattern=_ID, description="Model id by default (empty: the repo's name)")] | None = None
    revision: Annotated[str, Meta(description="Revision installed when none is asked for (empty: main)")] = ""
    metadata: ModelMetadata = ModelMetadata()
    settings: ModelSettings = ModelSettings()

    @property
    def model_id(self) -> str:
        return self.id or self.source.rsplit("/", 1)[-1]


class CatalogFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A catalog file (TOML)."""

    catalog_version: Annotated[int, Meta(ge=1, le=CATALOG_FORMAT)] = CATALOG_FORMAT
    models: list[CatalogEntry] = []


class ModelCatalog:
    """Catalog entries by source and by model id (later entries override earlier ones)."""

    def __init__(self, entries: list[CatalogEntry]) -> None:
        by_source: dict[str, CatalogEntry] = {}
        for entry in entries:
            by_source[entry.source.lower()] = entry
        self.entries = sorted(by_source.values(), key=lambda e: e.model_id.lower())
        self._by_source = by_source
        self._by_id = {e.model_id.lower(): e for e in self.entries}

    def find(self, name: str) -> CatalogEntry | None:
        """The entry of a repo (`org/name`, a `@revision` ignored) or a model id; None if unknown."""
        key = name.partition("@")[0].lower()
        return self._by_source.get(key) if "/" in key else self._by_id.get(key)


def _parse(text: str, where: str) -> CatalogFile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"catalog file {where} is not valid TOML: {exc}") from None
    try:
        catalog = msgspec.convert(data, CatalogFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"catalog file {where}: {validation_error(exc, '$').message}") from None
    ids: dict[str, str] = {}
    for i, entry in enumerate(catalog.models):
        try:
            check_metadata(entry.metadata, str(entry.task), prefix=f"$.models[{i}].metadata")
        except Exception as exc:
            raise ConfigError(f"catalog file {where}: {exc}") from None
        other = ids.setdefault(entry.model_id.lower(), entry.source)
        if other.lower() != entry.source.lower():
            raise ConfigError(
                f"catalog file {where}: models[{i}]: the id {entry.model_id!r} is given to both {other} and"
                f" {entry.source} (set `id` on one of them)"
            )
    return catalog


@functools.cache
def _shipped() -> CatalogFile:
    text = resources.files(__package__).joinpath("catalog.toml").read_text(encoding="utf-8")
    return _parse(text, "catalog.toml (shipped)")


def load_catalog(user_file: str | Path | None = None) -> ModelCatalog:
    """The shipped catalog, with the user's file (if any) over it.

    Raises:
        ConfigError: the user's file cannot be read or is not a valid catalog (the message names
            the file and the field).
    """
    entries = list(_shipped().models)
    if user_file:
        path = Path(user_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the catalog file {path}: {exc.strerror or exc}") from None
        entries += _parse(text, str(path)).models
    return ModelCatalog(entries)


def merge_metadata(base: ModelMetadata, over: Any) -> dict[str, Any]:
    """`over` (decoded JSON or `ModelMetadata`) over `base`, field by field (resources, config and
    params merged key by key), as decoded JSON to validate."""
    merged: dict[str, Any] = msgspec.to_builtins(base)
    given: dict[str, Any] = msgspec.to_builtins(over) if isinstance(over, ModelMetadata) else dict(over or {})
    for key, value in given.items():
        if key in ("resources", "config", "params") and isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged
