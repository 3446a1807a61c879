"""Wire messages between the supervisor and the zygote, and their framing (sans-IO plus blocking helpers).

The zygote (`modelmora_workers.zygote`) is a process that imported the model libraries once
and forks one worker per request. It talks to the supervisor over one `SOCK_SEQPACKET`
socket pair: each packet is exactly one msgpack-encoded message, so no length prefix is
needed, and a file descriptor rides with the packet it belongs to (`SCM_RIGHTS`):

- `Fork` (supervisor -> zygote) carries the worker's end of its control socket pair; the
  zygote forks a child that serves it as a normal worker and closes its own copy.
- `Forked` (zygote -> supervisor) carries a pidfd of the child, opened before the zygote
  could reap it, so the supervisor can wait for and signal exactly that process (no pid
  reuse race) although it is not its parent.
- `Exited` reports a child's exit status: only its parent (the zygote) can reap it.

Both sides import this module (`workers -> ipc`, `lifecycle -> ipc`). New fields are appended
with defaults; bump `ZYGOTE_PROTOCOL` on any incompatible change.
"""

from __future__ import annotations

import contextlib
import os
import socket

import msgspec

from .control import ProtocolError

__all__ = (
    "MAX_PACKET_BYTES",
    "ZYGOTE_PROTOCOL",
    "Exited",
    "Fork",
    "ForkFailed",
    "Forked",
    "Ready",
    "ZygoteMessage",
    "close_fds",
    "decode",
    "encode",
    "recv_packet",
    "send_packet",
)

ZYGOTE_PROTOCOL = 1
MAX_PACKET_BYTES = 256 * 1024
"""Largest packet either side accepts (a `Fork` with a large environment override is the biggest)."""


class Fork(msgspec.Struct, tag="fork", array_like=True, frozen=True):
    """Fork a worker serving the socket passed with this packet.

    `env` and `unset` are applied to the child's `os.environ` before it starts: the
    difference between the environment the worker would have been spawned with and the
    zygote's own. Libraries the zygote already imported have read their variables already.
    """

    request_id: int
    env: dict[str, str] = {}
    unset: list[str] = []


class Ready(msgspec.Struct, tag="ready", array_like=True, frozen=True):
    """First message from the zygote: its preloads are imported, it accepts `Fork`."""

    protocol: int
    pid: int
    import_ms: dict[str, float]
    """Per preloaded module, the time its import took."""
    failed: dict[str, str]
    """Per module that failed to import, the error (the zygote still serves)."""
    threads: int
    """OS threads of the zygote after its imports (only the forking one lives on in a child)."""
    cuda_initialised: bool
    """True when an import initialised CUDA: children could not use the GPU; not to be used."""
    rss_bytes: int = 0


class Forked(msgspec.Struct, tag="forked", array_like=True, frozen=True):
    """The child of request `request_id` runs as `pid`; a pidfd of it rides with the packet."""

    request_id: int
    pid: int


class ForkFailed(msgspec.Struct, tag="fork_failed", array_like=True, frozen=True):
    """The zygote could not fork for request `request_id`."""

    request_id: int
    message: str


class Exited(msgspec.Struct, tag="exited", array_like=True, frozen=True):
    """The zygote reaped child `pid`: `returncode` as in `subprocess` (-N: killed by signal N)."""

    pid: int
    returncode: int


ZygoteMessage = Fork | Ready | Forked | ForkFailed | Exited

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ZygoteMessage)


def encode(message: ZygoteMessage) -> bytes:
    """One packet's bytes.

    Raises:
        ProtocolError: the message exceeds `MAX_PACKET_BYTES`.
    """
    data = _encoder.encode(message)
    if len(data) > MAX_PACKET_BYTES:
        raise ProtocolError(f"zygote packet of {len(data)} bytes exceeds {MAX_PACKET_BYTES}")
    return data


def decode(data: bytes, flags: int, fds: list[int]) -> ZygoteMessage:
    """Decode one received packet (`flags` as returned by `recvmsg`).

    On error the received descriptors are closed before raising, so nothing leaks.

    Raises:
        ProtocolError: a truncated packet or descriptor list, or bytes that are no message.
    """
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError("truncated zygote packet")
        try:
            message: ZygoteMessage = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"undecodable zygote packet: {exc}") from exc
        return message
    except ProtocolError:
        close_fds(fds)
        raise


def close_fds(fds: list[int]) -> None:
    """Close received descriptors nobody will use."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def send_packet(sock: socket.socket, message: ZygoteMessage, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Blocking send of one message, with `fds` attached (the receiver gets duplicates)."""
    socket.send_fds(sock, [encode(message)], list(fds))


def recv_packet(sock: socket.socket, *, max_fds: int = 1) -> tuple[ZygoteMessage | None, list[int]]:
    """Blocking receive of one message and the descriptors attached to it; (None, []) at EOF.

    Raises:
        ProtocolError: see `decode`.
    """
    try:
        data, fds, flags, _ = socket.recv_fds(sock, MAX_PACKET_BYTES, max_fds, socket.MSG_CMSG_CLOEXEC)
    except ConnectionResetError:
        return None, []
    if not data and not fds:
        return None, []
    return decode(data, flags, fds), fds
