"""The zygote launcher: workers forked from a zygote process that imported the libraries once.

`ZygoteLauncher` owns a zygote (`python -m modelmora_workers.zygote`), a child of the
supervisor that imported the libraries once; each worker is a fork of it, ready to load
weights at once, sharing the imported pages copy-on-write. This module supervises the zygote
process (start, ready check, restart, give up) and chooses between a fork and a spawn; the
fork protocol itself (asking for a worker, watching it through a pidfd) is `zygote_client`'s.

Failure handling: while the zygote imports, launches wait for it (a spawn would import the
same libraries, competing for the same cores). When the zygote cannot start (it fails or
times out `max_start_failures` times in a row) or a preload initialised CUDA, the launcher
gives up on it and spawns. When a ready zygote dies, its workers die with it (their parent
death signal); launches spawn until a restarted zygote is ready (restart after
`restart_delay_s`, doubling up to `max_restart_delay_s` while it keeps dying).

Environment: the zygote starts with the environment every worker gets (the supervisor's,
or the scheduler's `worker_env`, plus OMP/MKL thread counts). A launch whose environment
differs sends only the difference, applied in the child after the fork; what the preloaded
libraries read at import time (OMP_NUM_THREADS, MKL_NUM_THREADS...) keeps the zygote's
value: the worker sets its torch thread count explicitly. CUDA_VISIBLE_DEVICES does apply
per worker, since the zygote never initialises CUDA.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import structlog

from ..broadcast import Broadcast
from ..ipc import zygote as zw
from ..ipc.control import ProtocolError
from .budget import process_memory, pss_bytes
from .launchers import SpawnLauncher, WorkerProcess
from .zygote_client import ForkedProcess, ZygoteClient, ZygoteUnavailable

__all__ = ("DEFAULT_PRELOAD", "ForkedProcess", "ZygoteLauncher", "ZygoteUnavailable")

log = structlog.get_logger("modelmora.launch")

DEFAULT_PRELOAD = ("numpy", "torch", "transformers", "sentence_transformers")
"""What the zygote imports unless configured otherwise (`zygote_preload`)."""


class ZygoteLauncher:
    """Forks workers from a zygote it owns; spawns when there is none (see the module docs).

    Use `async with launcher.running():` around everything that launches workers; launches
    outside that block spawn.

    Args:
        env: the environment of the zygote, so of every forked worker.
        preload: modules the zygote imports (after numpy, psutil, msgspec).
        python: the interpreter.
        ready_timeout_s: how long the zygote may take to import `preload`.
        stop_grace_s: how long the zygote may take to exit once its socket is closed.
        max_start_failures: consecutive failed starts after which the zygote is given up.
        restart_delay_s: the delay before restarting a zygote that exited, doubled while
            restarts keep failing, up to `max_restart_delay_s`.
        fallback: the launcher used when there is no zygote (default: spawn with the
            same preload list, so that workers import the same modules either way).
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        preload: Sequence[str] = DEFAULT_PRELOAD,
        python: str = sys.executable,
        ready_timeout_s: float = 300.0,
        stop_grace_s: float = 5.0,
        max_start_failures: int = 3,
        restart_delay_s: float = 1.0,
        max_restart_delay_s: float = 60.0,
        fallback: SpawnLauncher | None = None,
    ) -> None:
        self.env = dict(env)
        self.preload = tuple(preload)
        self.python = python
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self.max_start_failures = max_start_failures
        self.restart_delay_s = restart_delay_s
        self.max_restart_delay_s = max_restart_delay_s
        self.fallback = fallback or SpawnLauncher(python=python, preload=self.preload)
        self.state = "stopped"
        """stopped | starting | ready | down (restarting) | failed (given up: spawn only)."""
        self.starts = 0
        self.forks = 0
        self.spawns = 0
        self._zygote: ZygoteClient | None = None
        self._changed = Broadcast()

    @property
    def pid(self) -> int | None:
        """The pid of the ready zygote, if any."""
        return self._zygote.pid if self._zygote is not None else None

    def _set_state(self, state: str) -> None:
        self.state = state
        self._changed.notify()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ZygoteLauncher]:
        """Own the zygote (start it, restart it, stop it) for the duration of the block.

        The zygote starts in the background: the block runs at once, and launches wait for
        the zygote's imports. On exit the zygote's socket is closed and the zygote reaped;
        workers it forked that still run die with it, so stop them first.
        """
        async with anyio.create_task_group() as tg:
            self._set_state("starting")
            tg.start_soon(self._supervise, name="zygote")
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()
        self.state = "stopped"

    async def wait_ready(self) -> bool:
        """Wait while the zygote starts: True when it is ready, False when down or given up."""
        await self.wait_for("stopped", "ready", "down", "failed")
        return self.state == "ready" and self._zygote is not None

    async def wait_for(self, *states: str) -> None:
        """Wait until the state is one of `states`."""
        while self.state not in states:
            assert self.state != "stopped", "the launcher is not running"
            await self._changed.wait()

    async def _supervise(self) -> None:
        failures = 0
        delay = self.restart_delay_s
        while True:
            if self.state != "starting":
                self._set_state("starting")
            started = anyio.current_time()
            try:
                await self._run_zygote()
            except ZygoteUnavailable as exc:
                failures += 1
                log.warning("zygote_start_failed", error=str(exc), attempt=failures, of=self.max_start_failures)
                if failures >= self.max_start_failures or exc.permanent:
                    self._set_state("failed")
                    log.error("zygote_disabled", reason=str(exc), fallback="spawn")
                    return
            else:
                failures = 0
                if anyio.current_time() - started >= self.max_restart_delay_s:
                    delay = self.restart_delay_s  # it ran a good while: restart promptly
            self._set_state("down")
            log.warning("zygote_restarting", in_s=delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, self.max_restart_delay_s)

    async def _run_zygote(self) -> None:
        """Start one zygote and serve it until it exits.

        Raises:
            ZygoteUnavailable: it never became ready.
        """
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process: anyio.abc.Process | None = None
        zygote: ZygoteClient | None = None
        try:
            cmd = [self.python, "-P", "-m", "modelmora_workers.zygote", "--fd", str(child.fileno())]  # -P: see spawn
            cmd += ["--ppid", str(os.getpid()), "--preload", ",".join(self.preload)]
            cmd += ["--grace", f"{self.stop_grace_s * 0.8:g}"]  # children exiting at EOF: before we kill it
            try:
                process = await anyio.open_process(
                    cmd, stdin=subprocess.DEVNULL, stdout=None, stderr=None, pass_fds=(child.fileno(),), env=self.env
                )
            except OSError as exc:
                raise ZygoteUnavailable(f"cannot start the zygote: {exc}") from exc
            finally:
                child.close()
            parent.setblocking(False)
            zygote = ZygoteClient(process, parent)
            self.starts += 1
            log.info("zygote_starting", pid=process.pid, preload=",".join(self.preload))
            t0 = time.perf_counter()
            try:
                with anyio.fail_after(self.ready_timeout_s):
                    msg, fds = await zygote.receive()
            except TimeoutError as exc:
                raise ZygoteUnavailable(f"the zygote was not ready within {self.ready_timeout_s:g} s") from exc
            except ProtocolError as exc:
                raise ZygoteUnavailable(f"the zygote spoke nonsense: {exc}") from exc
            zw.close_fds(fds)
            self._check_ready(msg)
            assert isinstance(msg, zw.Ready)
            zygote.ready = msg
            self._zygote = zygote
            self._set_state("ready")
            log.info(
                "zygote_ready",
                pid=process.pid,
                ready_s=round(time.perf_counter() - t0, 2),
                import_ms={k: round(v) for k, v in msg.import_ms.items()},
                threads=msg.threads,
                rss_mb=round(msg.rss_bytes / 2**20, 1),
            )
            try:
                await zygote.serve()
            except ProtocolError:
                log.exception("zygote_protocol_error", pid=process.pid)
        finally:
            with anyio.CancelScope(shield=True):
                self._zygote = None
                if self.state == "ready":
                    self._set_state("down")
                if zygote is not None:
                    zygote.close()
                else:
                    parent.close()
                if process is not None:
                    with anyio.move_on_after(self.stop_grace_s):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                    if zygote is not None and zygote.ready is not None:
                        log.info("zygote_exited", pid=process.pid, returncode=process.returncode)

    def _check_ready(self, msg: zw.ZygoteMessage | None) -> None:
        if not isinstance(msg, zw.Ready):
            raise ZygoteUnavailable("the zygote exited before it was ready")
        if msg.protocol != zw.ZYGOTE_PROTOCOL:
            raise ZygoteUnavailable(
                f"the zygote speaks protocol {msg.protocol}, we {zw.ZYGOTE_PROTOCOL}", permanent=True
            )
        if msg.cuda_initialised:
            raise ZygoteUnavailable(
                "importing the preload list initialised CUDA, which forked workers cannot inherit;"
                " remove the module responsible from zygote_preload",
                permanent=True,
            )
        if msg.failed:
            log.warning("zygote_preload_failed", modules=msg.failed)

    async def launch(self, child_sock: socket.socket, env: Mapping[str, str], name: str) -> WorkerProcess:
        """Fork the worker from the zygote, or spawn it when there is no zygote (see `Launcher.launch`)."""
        if await self.wait_ready():
            zygote = self._zygote
            assert zygote is not None
            diff = {k: v for k, v in env.items() if self.env.get(k) != v}
            unset = [k for k in self.env if k not in env]
            try:
                process = await zygote.fork(child_sock, diff, unset)
            except ZygoteUnavailable as exc:
                log.warning("zygote_fork_failed", model=name, error=str(exc), fallback="spawn")
            else:
                self.forks += 1
                return process
        else:
            log.warning("zygote_unavailable", model=name, state=self.state, fallback="spawn")
        self.spawns += 1
        return await self.fallback.launch(child_sock, env, name)

    def shared_pss_bytes(self) -> int | None:
        """The zygote's PSS in bytes (it counts against the workers' budget); None without a zygote."""
        pid = self.pid
        return pss_bytes(pid) if pid is not None else None

    def statistics(self) -> dict[str, Any]:
        """State, pid, memory (RSS and PSS from smaps_rollup) and counters of the zygote."""
        zygote = self._zygote
        out: dict[str, Any] = {
            "state": self.state,
            "pid": None,
            "preload": list(self.preload),
            "starts": self.starts,
            "forks": self.forks,
            "spawned_instead": self.spawns,
        }
        if zygote is not None and zygote.ready is not None:
            out["pid"] = zygote.pid
            out["workers"] = len(zygote.children)
            out["import_ms"] = round(sum(zygote.ready.import_ms.values()), 1)
            out["failed_imports"] = dict(zygote.ready.failed)
            out.update(process_memory(zygote.pid) or {})
        return out
