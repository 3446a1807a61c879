"""The fork protocol client: one running zygote, seen from the supervisor.

`ZygoteClient` speaks `modelmora.ipc.zygote` over the zygote's `SOCK_SEQPACKET` socket: it asks
for a worker (`Fork`, with the worker's socket passed by `SCM_RIGHTS`) and dispatches the
answers (`Forked` with a pidfd of the child, `ForkFailed`, `Exited`). A forked worker is the
zygote's child, not ours: `ForkedProcess` watches it through that pidfd (`anyio.wait_readable`
works on asyncio and trio) and kills it through it too (no pid reuse race); its exit status is
what the zygote, which reaps it, reports. Starting, restarting and giving up on the zygote
process is `ZygoteLauncher`'s (`zygote`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket

import anyio
import anyio.abc

from ..errors import ModelLoadFailed
from ..ipc import zygote as zw
from ..ipc.control import ProtocolError

__all__ = ("ForkedProcess", "ZygoteClient", "ZygoteUnavailable")

_EXIT_REPORT_WAIT_S = 1.0


class ZygoteUnavailable(Exception):
    """The zygote could not start, or went away: spawn instead.

    Args:
        message: why.
        permanent: trying again cannot help (e.g. a preload initialised CUDA).
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class ForkedProcess:
    """A worker forked by the zygote: watched and killed through its pidfd.

    Its exit status comes from the zygote (its parent, which reaps it) in an `Exited`
    message; when the zygote died first it stays unknown (None).
    """

    def __init__(self, pid: int, pidfd: int) -> None:
        self._pid = pid
        self._pidfd = pidfd
        self._returncode: int | None = None
        self._exited = False
        self._reported = anyio.Event()
        self._wait_lock = anyio.Lock()

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def report(self, returncode: int | None) -> None:
        """Record the exit status the zygote reported (None: it will never report)."""
        if not self._reported.is_set():
            self._returncode = returncode
            self._reported.set()

    async def wait(self) -> int | None:
        """Wait for the pidfd to turn readable (the process exited), then briefly for its status."""
        async with self._wait_lock:  # one waiter per descriptor
            if not self._exited:
                if self._pidfd < 0:
                    raise anyio.ClosedResourceError
                await anyio.wait_readable(self._pidfd)
                self._exited = True
        with anyio.move_on_after(_EXIT_REPORT_WAIT_S):  # the zygote reaps it and reports at once
            await self._reported.wait()
        return self._returncode

    def kill(self) -> None:
        if self._pidfd >= 0 and not self._exited:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def close(self) -> None:
        if self._pidfd >= 0:
            anyio.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1


class _PendingFork:
    __slots__ = ("done", "error", "process")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.process: ForkedProcess | None = None
        self.error = ""


class ZygoteClient:
    """One running zygote, seen from the supervisor: its process and its control socket."""

    def __init__(self, process: anyio.abc.Process, sock: socket.socket) -> None:
        self.process = process
        self.pid = process.pid
        self.sock = sock
        self.ready: zw.Ready | None = None
        self.children: dict[int, ForkedProcess] = {}
        self._pending: dict[int, _PendingFork] = {}
        self._next_id = 0
        self._send_lock = anyio.Lock()
        self._closed = False

    async def receive(self) -> tuple[zw.ZygoteMessage | None, list[int]]:
        """The next packet and its descriptors; (None, []) when the zygote closed the socket."""
        while True:
            await anyio.wait_readable(self.sock)
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, zw.MAX_PACKET_BYTES, 1, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:  # pragma: no cover - spurious wake-up
                continue
            except ConnectionResetError:
                return None, []
            if not data and not fds:
                return None, []
            return zw.decode(data, flags, fds), fds

    async def _send(self, msg: zw.ZygoteMessage, fds: list[int]) -> None:
        data = zw.encode(msg)
        async with self._send_lock:
            while True:
                if self._closed:
                    raise ZygoteUnavailable("the zygote is gone")
                try:
                    socket.send_fds(self.sock, [data], fds)
                    return
                except BlockingIOError:  # pragma: no cover - the zygote reads promptly
                    try:
                        await anyio.wait_writable(self.sock)
                    except anyio.ClosedResourceError as exc:
                        raise ZygoteUnavailable("the zygote is gone") from exc
                except OSError as exc:
                    raise ZygoteUnavailable(f"the zygote is gone: {exc}") from exc

    async def fork(self, child_sock: socket.socket, env: dict[str, str], unset: list[str]) -> ForkedProcess:
        """Ask for a worker on `child_sock`.

        Raises:
            ZygoteUnavailable: the zygote went away before answering.
            ModelLoadFailed: the zygote could not fork.
        """
        self._next_id += 1
        rid = self._next_id
        pending = self._pending[rid] = _PendingFork()
        try:
            await self._send(zw.Fork(rid, env, unset), [child_sock.fileno()])
            await pending.done.wait()
        finally:  # cancelled: a late answer finds no request, and its pidfd is closed
            self._pending.pop(rid, None)
        if pending.process is not None:
            return pending.process
        if self._closed:
            raise ZygoteUnavailable(pending.error)
        raise ModelLoadFailed(f"cannot start a worker: {pending.error}")

    async def serve(self) -> None:
        """Dispatch the zygote's messages until it closes the socket.

        Raises:
            ProtocolError: the zygote sent something that is no valid answer.
        """
        while True:
            msg, fds = await self.receive()
            match msg:
                case None:
                    return
                case zw.Forked(request_id=rid, pid=pid):
                    pending = self._pending.get(rid)
                    if pending is None or len(fds) != 1:
                        zw.close_fds(fds)  # an abandoned request: its child exits at EOF on its socket
                        continue
                    process = self.children[pid] = ForkedProcess(pid, fds[0])
                    pending.process = process
                    pending.done.set()
                case zw.ForkFailed(request_id=rid, message=text):
                    zw.close_fds(fds)
                    pending = self._pending.get(rid)
                    if pending is not None:
                        pending.error = text
                        pending.done.set()
                case zw.Exited(pid=pid, returncode=code):
                    zw.close_fds(fds)
                    child = self.children.pop(pid, None)
                    if child is not None:
                        child.report(code)
                case _:
                    zw.close_fds(fds)
                    raise ProtocolError(f"unexpected message from the zygote: {type(msg).__name__}")

    def close(self) -> None:
        """Fail what waits on this zygote and close the socket (the zygote exits at EOF)."""
        self._closed = True
        for pending in self._pending.values():
            pending.error = "the zygote exited"
            pending.done.set()
        for child in self.children.values():
            child.report(None)  # the zygote reaps no more: the status stays unknown
        self.children.clear()
        anyio.notify_closing(self.sock)
        self.sock.close()
