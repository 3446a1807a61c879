"""The worker's end of its control socket: messages in and out, cancel flags, heartbeats.

Before the model is loaded the main thread reads the socket itself (`recv`). Once ready, a
reader thread of its own (`start_reader`) reads every message as it arrives: a `Cancel` sets
its batch's flag at once (`cancel.request`), even while every inference thread is busy, and
the rest waits in an inbox for the main loop. Several threads send (the main loop, the
inference streams, the heartbeat): each message is sent whole under one lock. From the `Load`
message on, a heartbeat thread (`start_heartbeat`) sends a `Heartbeat` every
`Load.heartbeat_s`, whatever the pipeline computes, so that the supervisor can tell a stalled
worker (stopped, or hung in a system call) from a busy one.
"""

from __future__ import annotations

import queue
import socket
import threading

from modelmora.ipc import messages as m
from modelmora.ipc.control import FrameDecoder, recv_message, send_message

from . import cancel

__all__ = ("Channel",)


class Channel:
    """The control socket `sock` (blocking), shared by the worker's threads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self.backlog: list[m.Message] = []
        self._inbox: queue.SimpleQueue[m.Message | None] | None = None
        self._send_lock = threading.Lock()
        self._stopping = threading.Event()
        """Set when the worker ends: the heartbeat thread stops."""

    def recv(self) -> m.Message | None:
        """The next message (from the inbox once the reader runs); None at EOF."""
        if self._inbox is not None:
            return self._inbox.get()
        return recv_message(self.sock, self.decoder, self.backlog)

    def send(self, msg: m.Message) -> None:
        """Send one message whole (from any thread)."""
        with self._send_lock:
            send_message(self.sock, msg)

    def _read_control(self) -> None:
        """Control reader thread: cancel flags take effect at once, the rest goes to the inbox."""
        assert self._inbox is not None
        try:
            while True:
                msg = recv_message(self.sock, self.decoder, self.backlog)
                if isinstance(msg, m.Cancel):
                    cancel.request(msg.batch_id)
                    continue
                self._inbox.put(msg)
                if msg is None or isinstance(msg, m.Shutdown):
                    return
        except OSError:
            self._inbox.put(None)

    def start_reader(self) -> None:
        """Read the socket from a thread of its own from now on (see the module docs)."""
        self._inbox = queue.SimpleQueue()
        threading.Thread(target=self._read_control, name="control-reader", daemon=True).start()

    def start_heartbeat(self, interval_s: float) -> None:
        """Send a `Heartbeat` every `interval_s` from a daemon thread until the worker ends (0: never)."""
        if interval_s <= 0:
            return

        def beat() -> None:
            while not self._stopping.wait(interval_s):
                try:
                    self.send(m.Heartbeat())
                except OSError:  # the supervisor closed the channel: the main thread sees it too
                    return

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()

    def close(self) -> None:
        """Stop the heartbeat (the socket is its owner's to close)."""
        self._stopping.set()
