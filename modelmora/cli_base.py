"""What every `mm` command shares: the consoles, settings, the registry, and how a command fails
(one line on stderr and a non-zero exit status, never a traceback)."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import cyclopts
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import Settings, load_settings
from .tasks import TaskType

if TYPE_CHECKING:
    from .registry import ModelStore

__all__ = (
    "CommandFailed",
    "StartFailed",
    "TaskChoice",
    "console",
    "err_console",
    "fail",
    "open_registry",
    "os_error",
    "print_json",
    "print_table",
    "settings_for",
)

TaskChoice = Annotated[TaskType | None, cyclopts.Parameter(name_transform=str.lower)]
"""`--task`: the task types of `TaskType`; cyclopts matches and lists a member by its name, lowercased,
which is its value (TXT2EMBED: txt2embed)."""

console = Console()
err_console = Console(stderr=True)


class CommandFailed(Exception):
    """A command met an expected failure: the message is printed as one line, the exit status is 1."""


class StartFailed(Exception):
    """`mm serve` could not start: the message is printed as one line and the exit status is 2."""


def settings_for(config: Path | None, home: Path | None = None, **overrides: Any) -> Settings:
    return load_settings(config, home=str(home) if home else None, **overrides)


def fail(message: str, status: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(status)


def os_error(exc: OSError) -> str:
    """`Permission denied: '/x/registry.sqlite3'` (no errno, no traceback)."""
    what = exc.strerror or str(exc) or type(exc).__name__
    return f"{what}: {exc.filename!r}" if exc.filename else what


def open_registry(settings: Settings) -> ModelStore:
    """The registry, or `CommandFailed` naming it when it cannot be opened."""
    from .registry import open_store

    try:
        return open_store(settings.registry_url, settings.home_path)
    except (OSError, sqlite3.Error) as exc:
        where = settings.registry_url or str(settings.home_path)
        reason = os_error(exc) if isinstance(exc, OSError) else str(exc)
        raise CommandFailed(f"cannot open the registry {where}: {reason}") from None


def print_table(table: Table) -> None:
    """Print a table; when stdout is not a terminal it is as wide as its widest row, so that no
    cell (an id, a path) is folded or cut."""
    if console.is_terminal:
        console.print(table)
        return
    wide = Console(width=100_000, force_terminal=False, no_color=True, highlight=False)
    width = wide.measure(table).maximum
    Console(width=max(width, 20), force_terminal=False, no_color=True, highlight=False).print(table)


def print_json(data: Any) -> None:
    """JSON for scripts (`--json`): one document on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()
