"""`mm lock`, `mm install` from a lock file (the registry pinned, and installed exactly) and
`mm cache` (the downloads kept by content)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import cyclopts
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from .cli_base import CommandFailed, console, err_console, open_registry, print_json, print_table, settings_for

__all__ = ("cache_app", "cache_list", "cache_prune", "install_from_lock", "lock", "lockfile_path")


def lockfile_path(lockfile: Path | None) -> Path:
    """`--lockfile`, else `modelmora.lock` in the current directory."""
    from .registry import LOCK_NAME

    return lockfile if lockfile is not None else Path.cwd() / LOCK_NAME


def lock(
    *,
    lockfile: Path | None = None,
    check: bool = False,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """Write modelmora.lock from the registry: every model, version, source, resolved revision and
    the SHA-256 of every file.

    Parameters
    ----------
    lockfile
        Where to write it (default: ./modelmora.lock).
    check
        Write nothing: fail unless the lock file already says exactly this (for CI).
    """
    from .registry import lock_from, read_lock, render_lock, write_lock

    path = lockfile_path(lockfile)
    settings = settings_for(config, home)
    wanted = lock_from(open_registry(settings).list())
    if check:
        if not path.is_file():
            raise CommandFailed(f"{path} does not exist: run mm lock")
        if render_lock(read_lock(path)) != render_lock(wanted):
            raise CommandFailed(f"{path} is out of date with the registry: run mm lock")
        console.print(f"{path} is up to date ({len(wanted.models)} models)")
        return
    write_lock(path, wanted)
    versions = sum(len(m.versions) for m in wanted.models)
    console.print(f"wrote {path}: {len(wanted.models)} models, {versions} versions", highlight=False)


def install_from_lock(
    lockfile: Path | None, *, frozen: bool, force: bool, check: bool, config: Path | None, home: Path | None
) -> None:
    """`mm install` with no source: install what the lock file pins (see `registry.install_locked`)."""
    from .registry import SourceLimits, install_locked, read_lock, write_lock

    path = lockfile_path(lockfile)
    if not path.is_file():
        raise CommandFailed(f"no SOURCE given and no lock file at {path} (write one with mm lock)")
    lock_file = read_lock(path)
    settings = settings_for(config, home)
    store = open_registry(settings)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        disable=not err_console.is_terminal,  # bars for people; logs and pipes get the result line only
    )

    def progress_for(ref: str) -> Callable[[int, int], None]:
        bar = progress.add_task(ref, total=None)

        def report(done: int, total: int) -> None:
            if not progress.live.is_started:
                progress.start()
            progress.update(bar, completed=done, total=total)

        return report

    try:
        result = install_locked(
            store,
            settings.home_path,
            lock_file,
            frozen=frozen,
            force=force,
            progress_for=progress_for,
            check_files=check,
            limits=SourceLimits.from_settings(settings),
            s3=settings.s3,
        )
    finally:
        progress.stop()
    if result.lock_changed:
        write_lock(path, result.lock)
    parts = [f"{len(result.installed)} installed", f"{len(result.verified)} already installed and verified"]
    if result.resolved:
        parts.append(f"{len(result.resolved)} resolved into {path.name}")
    if result.changed:
        parts.append(f"active version, settings or metadata set for {', '.join(result.changed)}")
    console.print(f"{path}: " + "; ".join(parts), highlight=False)


cache_app = cyclopts.App(
    name="cache",
    help="The download cache: archives and files fetched from URLs, S3 and Hugging Face, by content.",
)


@cache_app.command(name="list")
def cache_list(
    *,
    json_: Annotated[bool, cyclopts.Parameter(name="--json")] = False,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """List the cached downloads: SHA-256, size, when fetched, the URLs that served them.

    Parameters
    ----------
    json_
        Print JSON instead of a table.
    """
    from .registry import DownloadCache

    cache = DownloadCache.under(settings_for(config, home).home_path)
    entries = cache.entries()
    if json_:
        print_json([dataclasses.asdict(e) for e in entries])
        return
    partial = cache.partial_bytes()
    unfinished = f"{partial / 2**20:.1f} MiB of unfinished downloads (resumed by the next install)"
    if not entries:
        console.print(f"the download cache is empty ({cache.root})" + (f"; {unfinished}" if partial else ""))
        return
    table = Table("sha256", "size", "fetched", "urls")
    for e in entries:
        when = datetime.fromtimestamp(e.fetched_at, UTC).isoformat(timespec="seconds")
        table.add_row(e.sha256, f"{e.size_bytes / 2**20:.1f} MiB", when, "\n".join(e.urls))
    print_table(table)
    if partial:
        console.print(f"and {unfinished}")


@cache_app.command(name="prune")
def cache_prune(
    *,
    all_: Annotated[bool, cyclopts.Parameter(name="--all")] = False,
    config: Path | None = None,
    home: Path | None = None,
) -> None:
    """Remove cached downloads that no installed version uses (neither its source's content nor one
    of its files), and unfinished downloads.

    Parameters
    ----------
    all_
        Remove every cached download (installed models keep their files).
    """
    from .registry import DownloadCache

    settings = settings_for(config, home)
    keep: set[str] = set()
    if not all_:
        for rec in open_registry(settings).list():
            for v in rec.versions:
                # An archive is cached by the version's revision; a Hugging Face or S3 file, or a
                # single downloaded file, by its own SHA-256.
                keep.update(v.files.values())
                if v.revision:
                    keep.add(v.revision)
    removed, freed = DownloadCache.under(settings.home_path).prune(keep)
    console.print(f"removed {removed} files, {freed / 2**20:.1f} MiB")
