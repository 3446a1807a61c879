"""How worker processes start: the launcher protocols, and plain spawn.

A `Launcher` starts the process of one worker on the worker's end of its control socket
pair, and returns a `WorkerProcess`: what `WorkerHandle` needs to wait for, kill and forget
that process, whoever its parent is.

- `SpawnLauncher` (here): a fresh interpreter (`python -m modelmora_workers`), a child of the
  supervisor. It imports the libraries itself: seconds, and its own copy of them in memory.
- `ZygoteLauncher` (`zygote`): forks each worker from a zygote that imported the libraries once.

A launcher knows the worker only by a name for its messages (the model id): what to load
travels later, in the worker's `Load` message.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import anyio
import anyio.abc

from ..errors import ModelLoadFailed

__all__ = ("Launcher", "SpawnLauncher", "SpawnedProcess", "WorkerProcess", "worker_environment")


def worker_environment(base: Mapping[str, str] | None, threads: int) -> dict[str, str]:
    """The environment of a worker: `base` (default: ours) with its OpenMP/MKL thread counts."""
    count = str(max(1, threads))
    return {**(os.environ if base is None else base), "OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count}


class WorkerProcess(Protocol):
    """A started worker process, whoever its parent is."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None:
        """The exit status once known (-N: killed by signal N); None while it runs, or if unknown."""

    async def wait(self) -> int | None:
        """Wait until the process has exited; its exit status when known."""

    def kill(self) -> None:
        """SIGKILL it (nothing when it is gone)."""

    def close(self) -> None:
        """Release what watching it holds (after the last `wait`)."""


class Launcher(Protocol):
    """Starts worker processes."""

    async def launch(self, child_sock: socket.socket, env: Mapping[str, str], name: str) -> WorkerProcess:
        """Start a worker serving `child_sock` (the caller closes its copy afterwards); `name`
        (the model id) is for messages only.

        Raises:
            ModelLoadFailed: no process could be started.
        """

    def statistics(self) -> dict[str, Any] | None:
        """The zygote's state for the status endpoint; None when there is no zygote."""


class SpawnedProcess:
    """A worker spawned as our own child (adapts `anyio.abc.Process`)."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        return await self._process.wait()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()

    def close(self) -> None:
        """Nothing to release: the worker has no pipes."""


class SpawnLauncher:
    """Each worker is a fresh interpreter: `python -m modelmora_workers --fd N --ppid P`.

    Args:
        python: the interpreter.
        preload: modules the worker imports before its pipeline (as the zygote would have),
            timed apart from the load.
        extra_args: appended to the command line.
    """

    def __init__(self, *, python: str = sys.executable, preload: Sequence[str] = (), extra_args: Sequence[str] = ()):
        self.python = python
        self.preload = tuple(preload)
        self.extra_args = tuple(extra_args)

    async def launch(self, child_sock: socket.socket, env: Mapping[str, str], name: str) -> SpawnedProcess:
        """Spawn the worker (see `Launcher.launch`)."""
        fd = child_sock.fileno()
        # -P: the current directory never shadows our packages (e.g. a checkout of another version)
        cmd = [self.python, "-P", "-m", "modelmora_workers", "--fd", str(fd), "--ppid", str(os.getpid())]
        if self.preload:
            cmd += ["--preload", ",".join(self.preload)]
        try:
            process = await anyio.open_process(
                [*cmd, *self.extra_args],
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                pass_fds=(fd,),
                env=dict(env),
            )
        except OSError as exc:
            raise ModelLoadFailed(f"model {name!r}: cannot start a worker process") from exc
        return SpawnedProcess(process)

    def statistics(self) -> None:
        return None
