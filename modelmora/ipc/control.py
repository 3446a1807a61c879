"""Length-prefixed msgpack frames for the control channel (sans-IO plus a blocking helper).

A frame is a 4-byte big-endian length followed by one msgpack-encoded `Message`.
`FrameDecoder` turns received bytes into messages whatever the chunking, so the same code
serves the blocking worker and the async supervisor (which wraps a socket stream).
"""

from __future__ import annotations

import socket
import struct

import msgspec

from .messages import Message

__all__ = ("MAX_FRAME_BYTES", "FrameDecoder", "ProtocolError", "encode_frame", "recv_message", "send_message")

MAX_FRAME_BYTES = 16 * 1024 * 1024
_LEN = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class ProtocolError(Exception):
    """A peer sent a frame that is not a valid message: a bug on one side, never user input."""


def encode_frame(message: Message) -> bytes:
    """Encode one message with its length prefix.

    Raises:
        ProtocolError: the encoded message exceeds `MAX_FRAME_BYTES` (the peer would refuse
            it); bulk bytes belong in a ring or a segment, not in a control message.
    """
    buf = bytearray(4)
    _encoder.encode_into(message, buf, 4)
    size = len(buf) - 4
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"control frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    _LEN.pack_into(buf, 0, size)
    return bytes(buf)


class FrameDecoder:
    """Incremental decoder: `feed` bytes in, get complete messages out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add received bytes; return the messages they complete, in order.

        Raises:
            ProtocolError: a frame announces more than `MAX_FRAME_BYTES`, or is not a valid
                message. The stream cannot be resynchronised after that: close the channel.
        """
        self._buf += data
        out: list[Message] = []
        pos = 0
        try:
            while len(self._buf) - pos >= 4:
                (size,) = _LEN.unpack_from(self._buf, pos)
                if size > MAX_FRAME_BYTES:
                    raise ProtocolError(f"control frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
                if len(self._buf) - pos < 4 + size:
                    break
                with memoryview(self._buf) as view:
                    frame = view[pos + 4 : pos + 4 + size]
                    try:
                        out.append(_decoder.decode(frame))
                    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets bad UTF-8 in a tag through
                        raise ProtocolError(f"undecodable control frame: {exc}") from exc
                    finally:
                        frame.release()
                pos += 4 + size
        finally:
            del self._buf[:pos]
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)


def send_message(sock: socket.socket, message: Message) -> None:
    """Blocking send of one frame."""
    sock.sendall(encode_frame(message))


def recv_message(sock: socket.socket, decoder: FrameDecoder, backlog: list[Message]) -> Message | None:
    """Blocking receive of the next message; None when the peer closed the channel.

    `backlog` keeps messages that arrived in the same read as an earlier one. A peer that
    exits with messages of ours still unread resets the connection (ECONNRESET on a Unix
    socket pair): that counts as closed too. Bytes of an incomplete frame are dropped.

    Raises:
        ProtocolError: see `FrameDecoder.feed`.
    """
    while not backlog:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not data:
            return None
        backlog.extend(decoder.feed(data))
    return backlog.pop(0)
