"""Files that configure the server while it runs (the tokens file, the TLS certificate, key and client
CAs) are followed: each is polled every `POLL_S` seconds (size, mtime, inode: an atomic rename or a
Kubernetes secret's symlink swap counts), and SIGHUP reloads them all at once. A reload that fails
keeps what was loaded (the reloadable logs why)."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, Protocol

import anyio
import anyio.abc
import anyio.to_thread
import structlog

__all__ = ("POLL_S", "Reloadable", "follow_files")

log = structlog.get_logger("modelmora.security")

POLL_S = 1.0

_Signature = tuple[tuple[int, int, int] | None, ...]


class Reloadable(Protocol):
    """Something loaded from files that can load them again."""

    def watched_paths(self) -> list[Path]: ...

    def reload(self) -> bool:
        """Load the files again (blocking: called from a worker thread); False when it failed."""
        ...


def _signature(paths: Sequence[Path]) -> _Signature:
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


async def follow_files(
    targets: Sequence[Reloadable],
    *,
    poll_s: float = POLL_S,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Reload each target when its files change, and all of them on SIGHUP; runs until cancelled."""
    seen = [await anyio.to_thread.run_sync(_signature, t.watched_paths()) for t in targets]
    lock = anyio.Lock()  # one reload at a time, whatever started it

    async def reload(index: int, why: str) -> None:
        async with lock:
            target = targets[index]
            seen[index] = await anyio.to_thread.run_sync(_signature, target.watched_paths())
            log.info("reloading", what=type(target).__name__, why=why)
            await anyio.to_thread.run_sync(target.reload)

    async def on_sighup(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()  # from now on SIGHUP reloads (it no longer ends the process)
            async for _ in signals:
                if not targets:
                    log.info("reloading", what=None, why="SIGHUP")  # nothing configured to reload
                for index in range(len(targets)):
                    await reload(index, "SIGHUP")

    async with anyio.create_task_group() as tg:
        await tg.start(on_sighup)
        task_status.started()
        while True:
            await anyio.sleep(poll_s)
            for index, target in enumerate(targets):
                now = await anyio.to_thread.run_sync(_signature, target.watched_paths())
                if now != seen[index]:
                    await reload(index, "files changed")
    raise AssertionError("unreachable")  # pragma: no cover
