"""`mm` commands about a model's settings and metadata: set, metadata, catalog (the known models'
metadata); and the metadata flags `mm install` shares with them."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import cyclopts
import msgspec
from rich.table import Table

from .cli_base import CommandFailed, TaskChoice, console, open_registry, print_json, print_table, settings_for
from .errors import InvalidInput, ModelNotFound

__all__ = ("MetadataFlags", "catalog", "metadata", "metadata_from", "set_")


@cyclopts.Parameter(name="*")
@dataclass(frozen=True, kw_only=True)
class MetadataFlags:
    """The metadata flags of `mm install` and `mm metadata`: each replaces its field.

    Parameters
    ----------
    name
        Display name.
    description
        What the model does.
    source_url
        Where people can read about it (mm install: by default the Hugging Face page of a repo).
    param
        A custom parameter KEY=VALUE (VALUE as JSON, else as text); repeat it for more.
    memory_mb
        Resource hint: RAM of a loaded worker, MiB (the memory budget uses it until measured).
    gpu_vram_mb
        Resource hint: GPU memory of a loaded worker, MiB.
    cpu_threads
        Resource hint: threads its inference uses well.
    vector_size
        Dimension of its embeddings (embedding models).
    max_length
        Longest input in tokens (text models).
    """

    name: str | None = None
    description: str | None = None
    source_url: str | None = None
    param: list[str] | None = None
    memory_mb: float | None = None
    gpu_vram_mb: float | None = None
    cpu_threads: int | None = None
    vector_size: int | None = None
    max_length: int | None = None


def _read_metadata_file(path: Path) -> dict[str, Any]:
    """A metadata file: JSON, or TOML when it ends in .toml."""
    try:
        text = path.expanduser().read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except OSError as exc:
        raise CommandFailed(f"cannot read the metadata file {path}: {exc.strerror or exc}") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise CommandFailed(
            f"the metadata file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise CommandFailed(f"the metadata file {path} must hold an object")
    return data


def _param(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise InvalidInput(f"--param {item!r}: expected KEY=VALUE", field="params")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw  # not JSON: the text itself
    return key, value


def metadata_from(base: dict[str, Any] | None, file: Path | None, flags: MetadataFlags | None) -> dict[str, Any] | None:
    """The metadata the flags (None: no flag given) describe over `base` and the file (None: none
    given at all)."""
    f = flags or MetadataFlags()
    data: dict[str, Any] = json.loads(json.dumps(base or {}))
    if file is not None:
        data.update(_read_metadata_file(file))
    top = {"display_name": f.name, "description": f.description, "source_url": f.source_url}
    resources = {"memory_mb": f.memory_mb, "gpu_vram_mb": f.gpu_vram_mb, "cpu_threads": f.cpu_threads}
    config = {"vector_size": f.vector_size, "max_length": f.max_length}
    data.update({k: v for k, v in top.items() if v is not None})
    for section, values in (("resources", resources), ("config", config)):
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            current = data.get(section)
            data[section] = {**(current if isinstance(current, dict) else {}), **given}
    if f.param:
        current = data.get("params")
        data["params"] = {**(current if isinstance(current, dict) else {}), **dict(_param(p) for p in f.param)}
    flagged = (*top.values(), *resources.values(), *config.values())
    given_any = file is not None or bool(f.param) or any(v is not None for v in flagged)
    return data if (given_any or base is not None) else None


def set_(
    model_id: str,
    *,
    pinned: bool | None = None,
    preload: bool | None = None,
    keep_alive: str | None = None,
    device: str | None = None,
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None,
    max_batch_size: int | None = None,
    max_wait_ms: float | None = None,
    queue_limit: int | None = None,
    reset: bool = False,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """Change a model's settings (a running server applies them within a second).

    Parameters
    ----------
    model_id
        The model.
    pinned
        Never evict it to make room for other models.
    preload
        Load it when the server starts.
    keep_alive
        Idle time before its worker stops: 10m, 30s, 0 (right after use), -1 (never).
    device
        auto, cpu, cuda or cuda:N.
    reset
        Drop every setting first (back to the server's defaults).
    """
    from .config import ModelSettings

    settings = settings_for(config, home)
    store = open_registry(settings)
    rec = store.get(model_id)
    if rec is None:
        raise ModelNotFound(f"model {model_id!r} is not installed")
    given = {
        "pinned": pinned,
        "preload": preload,
        "keep_alive": keep_alive,
        "device": device,
        "dtype": dtype,
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "queue_limit": queue_limit,
    }
    merged = {} if reset else dict(rec.settings)
    merged.update({k: v for k, v in given.items() if v is not None})
    try:
        parsed = msgspec.convert(merged, ModelSettings)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid setting: {exc}") from None
    new = store.update_settings(model_id, msgspec.to_builtins(parsed))
    assert new is not None
    shown = ", ".join(f"{k}={v}" for k, v in sorted(new.settings.items())) or "server defaults"
    console.print(f"{model_id}: {shown}")


def metadata(
    model_id: str,
    *,
    flags: MetadataFlags | None = None,
    file: Path | None = None,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """Change a model's metadata: the flags (or the fields of --file) replace those fields.

    Parameters
    ----------
    model_id
        The model.
    file
        A JSON (or .toml) file with metadata fields (schema/model-metadata.schema.json).
    """
    from .registry import parse_metadata

    settings = settings_for(config, home)
    store = open_registry(settings)
    rec = store.get(model_id)
    if rec is None:
        raise ModelNotFound(f"model {model_id!r} is not installed")
    data = metadata_from(msgspec.to_builtins(rec.metadata), file, flags)
    new = store.update_metadata(model_id, parse_metadata(data, rec.task))
    assert new is not None
    console.print_json(msgspec.json.encode(new.metadata).decode())


def catalog(
    *,
    task: TaskChoice = None,
    json_: Annotated[bool, cyclopts.Parameter(name="--json")] = False,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """List the known models: `mm install SOURCE` (or its id) takes their task, metadata and
    defaults, so it needs no flags. The `catalog_file` setting adds your own.

    Parameters
    ----------
    task
        Only models of this task type.
    json_
        Print JSON instead of a table.
    """
    from .registry import load_catalog

    entries = load_catalog(settings_for(config, home).catalog_file).entries
    entries = [e for e in entries if task is None or e.task == task]
    if json_:
        print_json([{"id": e.model_id, **msgspec.to_builtins(e)} for e in entries])
        return
    table = Table("id", "task", "dim", "source", "description")
    for e in entries:
        dim = e.metadata.config.vector_size
        table.add_row(e.model_id, str(e.task), str(dim) if dim else "", e.source, e.metadata.description)
    print_table(table)
