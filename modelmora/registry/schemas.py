"""The registry's JSON Schemas, generated from its msgspec Structs and published under `schema/`
(`python -m modelmora.registry.schemas DIR` writes them; a test checks the committed files)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from .catalog import CatalogFile
from .lockfile import LockFile
from .metadata import ModelMetadata

__all__ = ("json_schemas", "main", "write_schemas")

_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _schema(type_: Any, title: str, description: str) -> dict[str, Any]:
    schema = msgspec.json.schema(type_)
    return {"$schema": _DIALECT, "title": title, "description": description, **schema}


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema of each registry document."""
    return {
        "model-metadata.schema.json": _schema(
            ModelMetadata,
            "ModelMora model metadata",
            "The metadata of a registered model: `metadata` of POST /api/v1/models and of"
            " PUT /api/v1/models/{id}/metadata, `mm install --metadata FILE`.",
        ),
        "catalog.schema.json": _schema(
            CatalogFile,
            "ModelMora model catalog",
            "A model catalog (TOML): known models with their task type, default id and revision, metadata and"
            " settings; the shipped catalog and the user's `catalog_file` have this form.",
        ),
        "modelmora-lock.schema.json": _schema(
            LockFile,
            "modelmora.lock",
            "The lock file (TOML) parsed: every model of a registry pinned with its versions, sources, resolved"
            " revisions and the SHA-256 of every file (`mm lock` writes it, `mm install` installs it).",
        ),
    }


def _text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(folder: Path) -> list[Path]:
    """Write every schema into `folder`; the paths written."""
    written = []
    for name, schema in json_schemas().items():
        path = folder / name
        path.write_text(_text(schema))
        written.append(path)
    return written


def main() -> None:
    """`python -m modelmora.registry.schemas [DIR]` (default: schema/)."""
    for path in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "schema")):
        sys.stdout.write(f"wrote {path}\n")


if __name__ == "__main__":
    main()
