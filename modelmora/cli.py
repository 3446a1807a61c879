"""The `mm` command line: argument parsing, progress bars and tables; the work is elsewhere.

`install`, `list`, `info` and `uninstall` work on the registry directly, whether or not a
server runs; a model installed while a server runs is served at once.
"""

from __future__ import annotations

import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import cyclopts
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from . import __version__
from .config import ConfigError, Settings, load_settings
from .errors import ModelMoraError
from .tasks import TaskType

if TYPE_CHECKING:
    from .registry import ModelStore

__all__ = ("app", "info", "install", "list_", "main", "serve", "set_", "uninstall")

TaskChoice = Annotated[TaskType | None, cyclopts.Parameter(name_transform=str.lower)]
"""`--task`: the task types of `TaskType`; cyclopts matches and lists a member by its name, lowercased,
which is its value (TXT2EMBED: txt2embed)."""

app = cyclopts.App(name="mm", help="ModelMora: a multi-model inference server.", version=__version__)
console = Console()
err_console = Console(stderr=True)


def _settings(config: Path | None, home: Path | None = None, **overrides: Any) -> Settings:
    return load_settings(config, home=str(home) if home else None, **overrides)


def _fail(message: str, status: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(status)


class _CommandFailed(Exception):
    """A command met an expected failure: the message is printed as one line, the exit status is 1."""


def _open_store(settings: Settings) -> ModelStore:
    """The registry, or `_CommandFailed` naming it when it cannot be opened."""
    from .registry import open_store

    try:
        return open_store(settings.registry_url, settings.home_path)
    except (OSError, sqlite3.Error) as exc:
        where = settings.registry_url or str(settings.home_path)
        reason = _os_error(exc) if isinstance(exc, OSError) else str(exc)
        raise _CommandFailed(f"cannot open the registry {where}: {reason}") from None


class _StartFailed(Exception):
    """`mm serve` could not start: the message is printed as one line and the exit status is 2."""


@app.command
def serve(
    *,
    host: str | None = None,
    port: int | None = None,
    grpc_port: int | None = None,
    backend: Literal["asyncio", "trio"] | None = None,
    config: Path | None = None,
    home: Path | None = None,
    print_config: bool = False,
) -> None:
    """Run the server (REST on HTTP/1.1 and HTTP/2 cleartext, gRPC on its own port).

    Parameters
    ----------
    host
        Address to listen on (default 127.0.0.1; binding others is explicit).
    port
        TCP port (default 8000; 0 picks a free one).
    grpc_port
        gRPC port on the same host (default 50051 on asyncio; 0 disables gRPC).
    backend
        Event loop: asyncio (default, the `backend` setting) or trio.
    config
        TOML configuration file.
    home
        Data directory (registry, model files); default $MODELMORA_HOME.
    print_config
        Print the effective configuration (file, then MODELMORA_* environment, then flags; secrets
        masked) as TOML, and exit.
    """
    from .logs import configure_logging
    from .server import StartupError, run

    try:
        settings = _settings(config, home, host=host, port=port, grpc_port=grpc_port, backend=backend)
    except ConfigError as exc:
        raise _StartFailed(str(exc)) from None
    if print_config:
        from .configview import render

        sys.stdout.write(render(settings))
        return
    configure_logging(settings.log_level, settings.log_format)
    try:
        run(settings)
    except (StartupError, ConfigError) as exc:
        raise _StartFailed(str(exc)) from None


@app.command
def install(
    source: str,
    *,
    id: Annotated[str | None, cyclopts.Parameter(name="--id")] = None,
    task: TaskChoice = None,
    version: str | None = None,
    force: bool = False,
    check: bool = True,
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
    check
        Check that the files are laid out as the task's loader expects (--no-check: a custom
        pipeline reads them).
    """
    from .registry import install as do_install

    settings = _settings(config, home)
    store = _open_store(settings)
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
            progress=report,
            check_files=check,
        )
    finally:
        progress.stop()
    v = rec.versions[-1]
    console.print(
        f"installed [bold]{rec.id}[/] {v.version} ({rec.task}, {len(v.files)} files, {v.size_bytes / 2**20:.1f} MiB)"
        f" from {rec.source}",
        highlight=False,
    )


@app.command(name="set")
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
    import msgspec

    from .config import ModelSettings
    from .errors import InvalidInput, ModelNotFound

    settings = _settings(config, home)
    store = _open_store(settings)
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


@app.command(name="list")
def list_(*, task: TaskChoice = None, config: Path | None = None, home: Path | None = None) -> None:
    """List installed models."""

    settings = _settings(config, home)
    recs = _open_store(settings).list(None if task is None else str(task))
    table = Table("id", "task", "active version", "versions", "size", "source")
    for r in recs:
        active = r.version_record()
        size = f"{active.size_bytes / 2**20:.1f} MiB" if active else "-"
        table.add_row(r.id, r.task, r.active_version, ", ".join(v.version for v in r.versions), size, r.source)
    if not recs:
        console.print("no models installed; add one with `mm install SOURCE`")
    else:
        console.print(table)


@app.command
def info(model_id: str, *, config: Path | None = None, home: Path | None = None) -> None:
    """Show one installed model, its versions and files."""

    settings = _settings(config, home)
    rec = _open_store(settings).get(model_id)
    if rec is None:
        _fail(f"model {model_id!r} is not installed")
        return
    console.print(f"[bold]{rec.id}[/]  task={rec.task}  active={rec.active_version}  source={rec.source}")
    for v in rec.versions:
        when = datetime.fromtimestamp(v.created_at, UTC).isoformat(timespec="seconds")
        table = Table("file", "sha256", title=f"version {v.version} ({when}) at {v.path} {v.revision}".strip())
        for name, sha in sorted(v.files.items()):
            table.add_row(name, sha)
        console.print(table)


@app.command
def uninstall(model_id: str, *, config: Path | None = None, home: Path | None = None) -> None:
    """Remove a model's registry entry and its copied files (never the original source)."""
    from .registry import uninstall as do_uninstall

    settings = _settings(config, home)
    rec = do_uninstall(_open_store(settings), settings.home_path, model_id)
    console.print(f"uninstalled {rec.id} ({', '.join(v.version for v in rec.versions)})")


def _os_error(exc: OSError) -> str:
    """`Permission denied: '/x/registry.sqlite3'` (no errno, no traceback)."""
    what = exc.strerror or str(exc) or type(exc).__name__
    return f"{what}: {exc.filename!r}" if exc.filename else what


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected errors become one clear line and exit status 1 (a model
    error, a bad configuration, a registry or home that cannot be opened, read or written); a
    server that cannot start (bad configuration, address in use, home not writable) exits 2."""
    try:
        app(sys.argv[1:] if argv is None else argv)
    except _StartFailed as exc:
        _fail(str(exc), status=2)
    except _CommandFailed as exc:
        _fail(str(exc))
    except ModelMoraError as exc:
        _fail(exc.message)
    except ConfigError as exc:
        _fail(str(exc))
    except sqlite3.Error as exc:
        _fail(f"registry: {exc}")
    except OSError as exc:
        _fail(_os_error(exc))
