"""`mm db`: the job store's schema (and the registry's), brought to this release's version."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import cyclopts

from .cli_base import CommandFailed, settings_for
from .config import ConfigError

__all__ = ("db_app", "upgrade")

db_app = cyclopts.App(name="db", help="The databases: the job store (database_url) and the registry.")


@db_app.command
def upgrade(*, config: Path | None = None, home: Path | None = None) -> None:
    """Apply the schema migrations this release needs (the server also applies them at start).

    Parameters
    ----------
    config
        TOML configuration file.
    home
        Data directory; default $MODELMORA_HOME.
    """
    from .jobs import JOBS_FILE, open_job_store, redact_url
    from .registry import open_store

    settings = settings_for(config, home)
    path = settings.home_path
    path.mkdir(parents=True, exist_ok=True)
    open_store(settings.registry_url, path).close()  # the registry migrates when opened

    async def jobs() -> str:
        async with open_job_store(settings, path) as store:
            version = getattr(store, "schema_version", None)
            if callable(version):
                return str(await version())
            return str(version)

    where = redact_url(settings.database_url) if settings.database_url else str(path / JOBS_FILE)
    try:
        version = anyio.run(jobs)  # asyncio: asyncpg needs it
    except ConfigError:
        raise
    except Exception as exc:
        raise CommandFailed(f"cannot open the job store (database_url = {where!r}): {exc}") from None
    sys.stdout.write(f"job store {where}: schema version {version}\nregistry: up to date\n")
