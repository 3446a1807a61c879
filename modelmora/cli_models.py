"""`mm` commands on the registry: install, list, info, set, metadata, activate, uninstall.

They work on the registry directly, whether or not a server runs; a running server follows
within its registry sync (a couple of seconds): a model installed is served, an activated
version takes the new requests, an uninstalled model stops.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

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
from .cli_meta import MetadataFlags, metadata_from
from .cli_remote import Remote, UrlOption, remote_install, server_url
from .errors import ModelNotFound

__all__ = ("activate", "info", "install", "list_", "model_json", "uninstall")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else "-"


def install(
    source: str | None = None,
    *,
    id: Annotated[str | None, cyclopts.Parameter(name="--id")] = None,
    task: TaskChoice = None,
    version: str | None = None,
    force: bool = False,
    activate: bool = False,
    check: bool = True,
    flags: MetadataFlags | None = None,
    metadata: Path | None = None,
    lockfile: Path | None = None,
    frozen: bool = False,
    url: UrlOption = None,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """Register a model from a local directory or a Hugging Face repo; with no SOURCE, install
    exactly what modelmora.lock pins, checking every checksum.

    Parameters
    ----------
    source
        ./path, /abs/path, ~/path, file://path; an http(s):// URL of an archive (tar, tar.gz,
        zip...) or of a single file; s3://bucket/prefix (the [s3] settings' endpoint and keys);
        org/name[@revision] on Hugging Face; the id of a catalog model (mm catalog); none: the lock
        file.
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
    metadata
        A JSON (or .toml) file with the model's metadata (schema/model-metadata.schema.json);
        the metadata flags override its fields.
    lockfile
        The lock file to install from (default: ./modelmora.lock).
    frozen
        With no SOURCE: fail instead of resolving an entry the lock gives no checksums for
        (the lock file is never changed).
    url
        Ask a running server to install it (in the background; followed here): an http(s), s3,
        Hugging Face or catalog source, not a local path.
    """
    from .registry import SourceLimits, load_catalog
    from .registry import install as do_install

    if source is None:
        from .cli_lock import install_from_lock

        install_from_lock(lockfile, frozen=frozen, force=force, check=check, config=config, home=home)
        return
    if frozen or lockfile is not None:
        raise CommandFailed("--frozen and --lockfile install from the lock file: give no SOURCE")

    meta = metadata_from(None, metadata, flags)
    if url is not None:
        body = {
            "source": source,
            "id": id,
            "task_type": None if task is None else str(task),
            "version": version,
            "force": force,
            "activate": activate,
            "metadata": meta,
            "check": check,
        }
        m = remote_install(server_url(url, config, home), body)
        v = next(x for x in m["versions"] if x["version"] == (version or "1.0.0"))
        console.print(
            f"installed [bold]{m['id']}[/] {v['version']} ({m['task_type']}, {v['files']} files,"
            f" {v['size_bytes'] / 2**20:.1f} MiB) from {m['source']} on {server_url(url, config, home)}",
            highlight=False,
        )
        return
    settings = settings_for(config, home)
    store = open_registry(settings)
    progress = Progress(
        TextColumn("[bold]copying"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        disable=not err_console.is_terminal,  # bars for people; logs and pipes get the result line only
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
            catalog=load_catalog(settings.catalog_file),
            limits=SourceLimits.from_settings(settings),
            s3=settings.s3,
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


def list_(
    *,
    task: TaskChoice = None,
    json_: Annotated[bool, cyclopts.Parameter(name="--json")] = False,
    url: UrlOption = None,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """List installed models.

    Parameters
    ----------
    task
        Only models of this task type.
    json_
        Print JSON (every field of every model, as GET /api/v1/models/{id} gives it).
    url
        Ask a running server instead of the local registry.
    """
    if url is not None:
        params = {"task_type": str(task)} if task is not None else {}
        models = Remote(server_url(url, config, home)).call("GET", "/api/v1/models", params=params)["models"]
    else:
        settings = settings_for(config, home)
        models = [model_json(r) for r in open_registry(settings).list(None if task is None else str(task))]
    if json_:
        print_json(models)
        return
    if not models:
        console.print("no models installed; add one with `mm install SOURCE`")
        return
    table = Table("id", "task", "active", "versions", "size", "name", "source")
    for m in models:
        active = next((v for v in m["versions"] if v["version"] == m["active_version"]), None)
        size = f"{active['size_bytes'] / 2**20:.1f} MiB" if active else "-"
        versions = ", ".join(v["version"] for v in m["versions"])
        pin = " (pinned)" if m["active_pinned"] else ""
        name = m["metadata"].get("display_name", "")
        table.add_row(m["id"], m["task_type"], m["active_version"] + pin, versions, size, name, m["source"])
    print_table(table)


def model_json(rec: Any) -> dict[str, Any]:
    """A registry record as JSON, in the shape `GET /api/v1/models/{id}` answers (versions in
    semantic-version order, each with its files' SHA-256 under `checksums`)."""
    from .registry import semver_key

    versions = [
        {
            "version": v.version,
            "revision": v.revision,
            "size_bytes": v.size_bytes,
            "files": len(v.files),
            "created_at": v.created_at,
            "checksums": dict(sorted(v.files.items())),
            "path": v.path,
        }
        for v in sorted(rec.versions, key=lambda v: semver_key(v.version))
    ]
    return {
        "id": rec.id,
        "task_type": rec.task,
        "source": rec.source,
        "active_version": rec.active_version,
        "versions": versions,
        "settings": dict(rec.settings),
        "metadata": msgspec.to_builtins(rec.metadata),
        "active_pinned": rec.active_pinned,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
    }


def info(
    model_id: str,
    *,
    json_: Annotated[bool, cyclopts.Parameter(name="--json")] = False,
    url: UrlOption = None,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """Show one installed model: metadata, settings, versions and their files' checksums.

    Parameters
    ----------
    json_
        Print JSON instead of tables.
    url
        Ask a running server instead of the local registry.
    """
    if url is not None:
        m = Remote(server_url(url, config, home)).call("GET", f"/api/v1/models/{model_id}")
    else:
        rec = open_registry(settings_for(config, home)).get(model_id)
        if rec is None:
            raise ModelNotFound(f"model {model_id!r} is not installed")
        m = model_json(rec)
    if json_:
        print_json(m)
        return
    meta = m["metadata"]
    pin = " (pinned)" if m["active_pinned"] else ""
    console.print(
        f"[bold]{m['id']}[/]  task={m['task_type']}  active={m['active_version']}{pin}  source={m['source']}",
        highlight=False,
    )
    about = Table("field", "value", title="metadata", show_header=False)
    rows = {
        "name": meta.get("display_name", ""),
        "description": meta.get("description", ""),
        "source url": meta.get("source_url") or "",
        "resources": ", ".join(f"{k}={v}" for k, v in meta.get("resources", {}).items()),
        "config": ", ".join(f"{k}={v}" for k, v in meta.get("config", {}).items()),
        "params": json.dumps(meta["params"]) if meta.get("params") else "",
        "settings": ", ".join(f"{k}={v}" for k, v in sorted(m["settings"].items())),
        "created": _when(m["created_at"]),
        "updated": _when(m["updated_at"]),
    }
    for key, value in rows.items():
        if value:
            about.add_row(key, value)
    print_table(about)
    for v in m["versions"]:
        where = f" at {v['path']}" if v.get("path") else ""
        title = f"version {v['version']} ({_when(v['created_at'])}){where} {v['revision']}".strip()
        table = Table("file", "sha256", title=title)
        for name, sha in v["checksums"].items():
            table.add_row(name, sha)
        print_table(table)


def activate(
    model_id: str,
    version: str,
    *,
    pin: bool | None = None,
    url: UrlOption = None,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """Make a version the active one (upgrade or downgrade): requests without a version go to it;
    a running server's previous version finishes what it holds, then stops. Refused when a file of
    the version changed since it was installed.

    Parameters
    ----------
    model_id
        The model.
    version
        An installed version.
    pin
        --pin: later installs with --activate leave it active; --no-pin: unpin.
    url
        Ask a running server (it switches at once) instead of changing the local registry.
    """
    from .registry import activate as do_activate

    if url is not None:
        remote = Remote(server_url(url, config, home))
        before = remote.call("GET", f"/api/v1/models/{model_id}")["active_version"]
        body = {} if pin is None else {"pin": pin}
        after = remote.call("POST", f"/api/v1/models/{model_id}/versions/{version}", json=body)
        old, pinned = before, after["active_pinned"]
    else:
        from .registry import FileVerifier

        settings = settings_for(config, home)
        verifier = FileVerifier.under(settings.home_path)
        rec, new = do_activate(open_registry(settings), model_id, version, pin=pin, verifier=verifier)
        old, pinned = rec.active_version, new.active_pinned
    was = "" if old == version else f" (was {old})"
    console.print(f"{model_id}: active version {version}{was}{' (pinned)' if pinned else ''}")


def uninstall(
    model_id: str,
    *,
    force: bool = False,
    url: UrlOption = None,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """Remove a model (ID) or one version (ID@VERSION, not the active one) with its copied files
    (never the original source).

    Parameters
    ----------
    model_id
        ID, or ID@VERSION for one version.
    force
        With --url: unload a loaded model first (else the server refuses).
    url
        Ask a running server instead of changing the local registry.
    """
    from .registry import split_ref
    from .registry import uninstall as do_uninstall

    mid, version = split_ref(model_id)
    if url is not None:
        path = f"/api/v1/models/{mid}" + (f"/versions/{version}" if version else "")
        rec = Remote(server_url(url, config, home)).call("DELETE", path, params={"force": str(force).lower()})
        left = [v["version"] for v in rec["versions"]]
        gone = version is None or version in left
    else:
        settings = settings_for(config, home)
        after = do_uninstall(open_registry(settings), settings.home_path, mid, version)
        left = [v.version for v in after.versions]
        gone = version is None or after.version_record(version) is not None
    if gone:
        console.print(f"uninstalled {mid} ({', '.join(left)})")
    else:
        console.print(f"uninstalled {mid} {version} (left: {', '.join(left)})")
