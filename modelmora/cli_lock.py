"""`mm lock` and `mm install` from a lock file: the registry pinned, and installed exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from .cli_base import CommandFailed, console, err_console, open_registry, settings_for

__all__ = ("install_from_lock", "lock", "lockfile_path")


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
    from .registry import install_locked, read_lock, write_lock

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
