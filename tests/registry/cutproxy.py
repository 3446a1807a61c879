"""A TCP proxy that cuts a download midway: put it between a client and an HTTP server (S3, a fake
Hub) to interrupt an answer after some bytes, as a dropped network connection would."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Self

__all__ = ("CutProxy",)


class CutProxy:
    """Forwards 127.0.0.1:`port` to `target`. `cut(marker, after, times)` arms it: the next `times`
    connections that send a request holding `marker` (a path) are closed once `after` bytes of the
    answers that follow have been forwarded. Every request's head is kept in `requests` (lower
    case)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.requests: list[str] = []
        self.cuts_done = 0
        self._armed: tuple[bytes, int, int] | None = None
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="cutproxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self, marker: str, after: int, times: int = 1) -> None:
        with self._lock:
            self._armed = (marker.encode(), after, times) if times > 0 else None

    def disarm(self) -> None:
        self.cut("", 0, times=0)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._listener.close()
        with self._lock:
            for s in self._open:
                _close(s)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._open += [client, server]
            budget: list[int | None] = [None]  # bytes of answer left before the cut; None: no cut
            threading.Thread(target=self._up, args=(client, server, budget), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, budget), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, budget: list[int | None]) -> None:
        while data := _recv(client):
            with self._lock:
                self.requests.append(data.decode("latin-1").lower())
                if self._armed is not None and self._armed[0] in data and budget[0] is None:
                    marker, after, times = self._armed
                    budget[0], self._armed = after, (marker, after, times - 1) if times > 1 else None
            try:
                server.sendall(data)
            except OSError:
                break
        _close(server)

    def _down(self, server: socket.socket, client: socket.socket, budget: list[int | None]) -> None:
        while data := _recv(server):
            left = budget[0]
            if left is not None and len(data) >= left:
                try:
                    client.sendall(data[:left])
                finally:
                    with self._lock:
                        self.cuts_done += 1
                    _close(client)
                    _close(server)
                return
            if left is not None:
                budget[0] = left - len(data)
            try:
                client.sendall(data)
            except OSError:
                break
        _close(client)


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(1 << 16)
    except OSError:
        return b""


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
