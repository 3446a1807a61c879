"""`mm` commands on the registry: install, list, info, set, metadata, activate, uninstall.

They work on the registry directly, whether or not a server runs; a running server follows
within its registry sync (a couple of seconds): a model installed is served, an activated
version takes the new requests, an uninstalled model stops.
"""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import cyclopts
import msgspec
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from .cli_base import (
    CommandFailed,
    TaskChoice,
    console,
    err_console,
    open_registry,
    print_json,
    print_table,
    settings_for,
)
from .errors import InvalidInput, ModelNotFound

__all__ = ("activate", "info", "install", "list_", "metadata", "model_json", "set_", "uninstall")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else "-"


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


def _metadata_from(
    base: dict[str, Any] | None,
    file: Path | None,
    *,
    name: str | None,
    description: str | None,
    source_url: str | None,
    params: list[str] | None,
    memory_mb: float | None,
    gpu_vram_mb: float | None,
    cpu_threads: int | None,
    vector_size: int | None,
    max_length: int | None,
) -> dict[str, Any] | None:
    """The metadata the flags describe over `base` and the file (None: none given at all)."""
    data: dict[str, Any] = json.loads(json.dumps(base or {}))
    if file is not None:
        data.update(_read_metadata_file(file))
    top = {"display_name": name, "description": description, "source_url": source_url}
    data.update({k: v for k, v in top.items() if v is not None})
    for section, values in (
        ("resources", {"memory_mb": memory_mb, "gpu_vram_mb": gpu_vram_mb, "cpu_threads": cpu_threads}),
        ("config", {"vector_size": vector_size, "max_length": max_length}),
    ):
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            current = data.get(section)
            data[section] = {**(current if isinstance(current, dict) else {}), **given}
    if params:
        current = data.get("params")
        data["params"] = {**(current if isinstance(current, dict) else {}), **dict(_param(p) for p in params)}
    given_any = file is not None or params or any(v is not None for v in (*top.values(), memory_mb, gpu_vram_mb))
    given_any = given_any or any(v is not None for v in (cpu_threads, vector_size, max_length))
    return data if (given_any or base is not None) else None


def install(
    source: str,
    *,
    id: Annotated[str | None, cyclopts.Parameter(name="--id")] = None,
    task: TaskChoice = None,
    version: str | None = None,
    force: bool = False,
    activate: bool = False,
    check: bool = True,
    name: str | None = None,
    description: str | None = None,
    source_url: str | None = None,
    param: list[str] | None = None,
    metadata: Path | None = None,
    memory_mb: float | None = None,
    gpu_vram_mb: float | None = None,
    cpu_threads: int | None = None,
    vector_size: int | None = None,
    max_length: int | None = None,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """Register a model from a local directory or a Hugging Face repo.

    Parameters
    ----------
    source
        ./path, /abs/path, ~/path, file://path, or org/name[@revision] on Hugging Face.
    id
        Model id (default: the directory or repo name).
    task
        Task type; required when the files do not tell.
    version
        Semantic version of this install (default 1.0.0).
    force
        Reinstall an existing version.
    activate
        Make this version the active one (a model's first version always is; refused when the
        active version is pinned).
    check
        Check that the files are laid out as the task's loader expects (--no-check: a custom
        pipeline reads them).
    name
        Display name.
    description
        What the model does.
    source_url
        Where people can read about it (default: the Hugging Face page of a repo).
    param
        A custom parameter KEY=VALUE (VALUE as JSON, else as text); repeat it for more.
    metadata
        A JSON (or .toml) file with the model's metadata (schema/model-metadata.schema.json);
        the flags above override its fields.
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
    from .registry import install as do_install

    meta = _metadata_from(
        None,
        metadata,
        name=name,
        description=description,
        source_url=source_url,
        params=param,
        memory_mb=memory_mb,
        gpu_vram_mb=gpu_vram_mb,
        cpu_threads=cpu_threads,
        vector_size=vector_size,
        max_length=max_length,
    )
    settings = settings_for(config, home)
    store = open_registry(settings)
    progress = Progress(
        TextColumn("[bold]copying"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=err_console
    )
    bar = progress.add_task("copy", total=None)

    def report(done: int, total: int) -> None:
        if not progress.live.is_started:  # shown once the files are checked and the copy starts
            progress.start()
        progress.update(bar, completed=done, total=total)

    try:
        rec = do_install(
            store,
            settings.home_path,
            source,
            model_id=id,
            task=None if task is None else str(task),
            version=version,
            force=force,
            activate=activate,
            metadata=meta,
            progress=report,
            check_files=check,
        )
    finally:
        progress.stop()
    v = rec.versions[-1] if version is None else rec.version_record(version) or rec.versions[-1]
    active = "" if rec.active_version == v.version else f"; active version stays {rec.active_version}"
    console.print(
        f"installed [bold]{rec.id}[/] {v.version} ({rec.task}, {len(v.files)} files, {v.size_bytes / 2**20:.1f} MiB)"
        f" from {rec.source}{active}",
        highlight=False,
    )


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
    name: str | None = None,
    description: str | None = None,
    source_url: str | None = None,
    param: list[str] | None = None,
    file: Path | None = None,
    memory_mb: float | None = None,
    gpu_vram_mb: float | None = None,
    cpu_threads: int | None = None,
    vector_size: int | None = None,
    max_length: int | None = None,
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
    data = _metadata_from(
        msgspec.to_builtins(rec.metadata),
        file,
        name=name,
        description=description,
        source_url=source_url,
        params=param,
        memory_mb=memory_mb,
        gpu_vram_mb=gpu_vram_mb,
        cpu_threads=cpu_threads,
        vector_size=vector_size,
        max_length=max_length,
    )
    new = store.update_metadata(model_id, parse_metadata(data, rec.task))
    assert new is not None
    console.print_json(msgspec.json.encode(new.metadata).decode())


def list_(
    *,
    task: TaskChoice = None,
    json_: Annotated[bool, cyclopts.Parameter(name="--json")] = False,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """List installed models.

    Parameters
    ----------
    task
        Only models of this task type.
    json_
        Print JSON (every field of every model) instead of a table.
    """
    from .registry import semver_key

    settings = settings_for(config, home)
    recs = open_registry(settings).list(None if task is None else str(task))
    if json_:
        print_json([model_json(r) for r in recs])
        return
    if not recs:
        console.print("no models installed; add one with `mm install SOURCE`")
        return
    table = Table("id", "task", "active", "versions", "size", "name", "source")
    for r in recs:
        active = r.version_record()
        size = f"{active.size_bytes / 2**20:.1f} MiB" if active else "-"
        versions = ", ".join(sorted((v.version for v in r.versions), key=semver_key))
        pin = " (pinned)" if r.active_pinned else ""
        table.add_row(r.id, r.task, r.active_version + pin, versions, size, r.metadata.display_name, r.source)
    print_table(table)


def model_json(rec: Any) -> dict[str, Any]:
    """A registry record as JSON for scripts (`--json`)."""
    out: dict[str, Any] = msgspec.to_builtins(rec)
    out["task_type"] = out.pop("task")
    return out


def info(
    model_id: str,
    *,
    json_: Annotated[bool, cyclopts.Parameter(name="--json")] = False,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """Show one installed model: metadata, settings, versions and their files' checksums.

    Parameters
    ----------
    json_
        Print JSON instead of tables.
    """
    from .registry import semver_key

    settings = settings_for(config, home)
    rec = open_registry(settings).get(model_id)
    if rec is None:
        raise ModelNotFound(f"model {model_id!r} is not installed")
    if json_:
        print_json(model_json(rec))
        return
    m = rec.metadata
    pin = " (pinned)" if rec.active_pinned else ""
    console.print(
        f"[bold]{rec.id}[/]  task={rec.task}  active={rec.active_version}{pin}  source={rec.source}", highlight=False
    )
    about = Table("field", "value", title="metadata", show_header=False)
    rows = {
        "name": m.display_name,
        "description": m.description,
        "source url": m.source_url or "",
        "resources": ", ".join(f"{k}={v}" for k, v in msgspec.to_builtins(m.resources).items()),
        "config": ", ".join(f"{k}={v}" for k, v in msgspec.to_builtins(m.config).items()),
        "params": json.dumps(m.params) if m.params else "",
        "settings": ", ".join(f"{k}={v}" for k, v in sorted(rec.settings.items())),
        "created": _when(rec.created_at),
        "updated": _when(rec.updated_at),
    }
    for key, value in rows.items():
        if value:
            about.add_row(key, value)
    print_table(about)
    for v in sorted(rec.versions, key=lambda v: semver_key(v.version)):
        title = f"version {v.version} ({_when(v.created_at)}) at {v.path} {v.revision}".strip()
        table = Table("file", "sha256", title=title)
        for name, sha in sorted(v.files.items()):
            table.add_row(name, sha)
        print_table(table)


def activate(
    model_id: str,
    version: str,
    *,
    pin: bool | None = None,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """Make a version the active one (upgrade or downgrade): requests without a version go to it;
    a running server's previous version finishes what it holds, then stops.

    Parameters
    ----------
    model_id
        The model.
    version
        An installed version.
    pin
        --pin: later installs with --activate leave it active; --no-pin: unpin.
    """
    from .registry import check_version

    settings = settings_for(config, home)
    store = open_registry(settings)
    rec = store.get(model_id)
    if rec is None:
        raise ModelNotFound(f"model {model_id!r} is not installed")
    check_version(version)
    if rec.version_record(version) is None:
        have = ", ".join(v.version for v in rec.versions)
        raise ModelNotFound(f"model {model_id!r} has no version {version} (installed: {have})")
    new = store.set_active(model_id, version, pinned=pin)
    if new is None:
        raise ModelNotFound(f"model {model_id!r} has no version {version}")
    was = "" if rec.active_version == version else f" (was {rec.active_version})"
    console.print(f"{model_id}: active version {version}{was}{' (pinned)' if new.active_pinned else ''}")


def uninstall(model_id: str, *, config: Path | None = None, home: Path | None = None) -> None:
    """Remove a model (ID) or one version (ID@VERSION, not the active one) with its copied files
    (never the original source).

    Parameters
    ----------
    model_id
        ID, or ID@VERSION for one version.
    """
    from .registry import split_ref
    from .registry import uninstall as do_uninstall

    mid, version = split_ref(model_id)
    settings = settings_for(config, home)
    rec = do_uninstall(open_registry(settings), settings.home_path, mid, version)
    if version is None or rec.version_record(version) is not None:
        console.print(f"uninstalled {rec.id} ({', '.join(v.version for v in rec.versions)})")
    else:
        console.print(f"uninstalled {rec.id} {version} (left: {', '.join(v.version for v in rec.versions)})")
