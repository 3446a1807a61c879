"""The `mm` command line: argument parsing, progress bars and tables; the work is elsewhere.

`serve` runs the server; the registry commands (`cli_models`) work on the registry directly,
whether or not a server runs. Every expected failure is one line on stderr and a non-zero exit
status, never a traceback.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Literal

import cyclopts

from . import __version__, cli_db, cli_init, cli_lock, cli_meta, cli_models, cli_remote
from .cli_base import CommandFailed, StartFailed, fail, os_error, settings_for
from .cli_lock import lock
from .cli_meta import catalog, metadata, set_
from .cli_models import activate, info, install, list_, uninstall
from .cli_remote import health, load, status, unload
from .config import ConfigError
from .errors import ModelMoraError

__all__ = (
    "health",
    "load",
    "status",
    "unload",
    "activate",
    "app",
    "catalog",
    "info",
    "install",
    "list_",
    "lock",
    "main",
    "metadata",
    "serve",
    "set_",
    "uninstall",
)

app = cyclopts.App(name="mm", help="ModelMora: a multi-model inference server.", version=__version__)
app.command(cli_models.install)
app.command(cli_models.list_, name="list")
app.command(cli_models.info)
app.command(cli_meta.set_, name="set")
app.command(cli_meta.metadata)
app.command(cli_models.activate)
app.command(cli_models.uninstall)
app.command(cli_lock.lock)
app.command(cli_lock.cache_app)
app.command(cli_meta.catalog)
app.command(cli_init.init)
app.command(cli_remote.status)
app.command(cli_remote.health)
app.command(cli_remote.load)
app.command(cli_remote.unload)
app.command(cli_db.db_app)


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
        settings = settings_for(config, home, host=host, port=port, grpc_port=grpc_port, backend=backend)
    except ConfigError as exc:
        raise StartFailed(str(exc)) from None
    if print_config:
        from .configview import render

        sys.stdout.write(render(settings))
        return
    configure_logging(settings.log_level, settings.log_format)
    try:
        run(settings)
    except (StartupError, ConfigError) as exc:
        raise StartFailed(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected errors become one clear line and exit status 1 (a model
    error, a bad configuration, a registry or home that cannot be opened, read or written); a
    server that cannot start (bad configuration, address in use, home not writable) exits 2."""
    try:
        app(sys.argv[1:] if argv is None else argv)
    except StartFailed as exc:
        fail(str(exc), status=2)
    except CommandFailed as exc:
        fail(str(exc))
    except ModelMoraError as exc:
        fail(exc.message)
    except ConfigError as exc:
        fail(str(exc))
    except sqlite3.Error as exc:
        fail(f"registry: {exc}")
    except OSError as exc:
        fail(os_error(exc))
