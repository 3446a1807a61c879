"""The control channel: length-prefixed msgpack frames, whatever the chunking."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import subprocess
import sys
import threading

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelmora.ipc import control
from modelmora.ipc.control import MAX_FRAME_BYTES, FrameDecoder, ProtocolError, encode_frame, recv_message, send_message
from modelmora.ipc.messages import (
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Infer,
    Load,
    Loaded,
    Message,
    Phase,
    Result,
    Shutdown,
    Span,
    Tensor,
    Text,
)

names = st.text(max_size=12)
ints = st.integers(-(2**63), 2**64 - 1)
scalars = st.none() | st.booleans() | ints | st.floats(allow_nan=False) | names
params = st.dictionaries(names, scalars | st.lists(scalars, max_size=3), max_size=4)
spans = st.builds(Span, names, st.integers(0, 2**62), st.integers(0, 2**40))
inputs = st.builds(
    Tensor, spans, st.sampled_from(["<f4", "<f2", "|u1", "<i8"]), st.tuples(st.integers(0, 9))
) | st.builds(Text, spans, st.lists(st.integers(0, 1000), max_size=5))
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Infer, st.integers(0, 2**31), st.dictionaries(names, inputs, max_size=3), params),
    st.builds(Result, st.integers(-1, 2**31), st.dictionaries(names, inputs, max_size=3), st.floats(0, 1e6)),
    st.builds(Error, st.integers(-1, 2**31), st.sampled_from(ErrorCode), st.text(max_size=200)),
    st.builds(Hello, st.just(PROTOCOL_VERSION), st.integers(1, 2**22)),
    st.builds(Shutdown),
    st.builds(
        Loaded, st.floats(0, 1e6), st.floats(0, 1e6), st.integers(0, 2**40), names, st.floats(0, 1e6), st.booleans()
    ),
    st.builds(Phase, names),
    st.builds(Heartbeat),
    st.builds(
        Load, names, st.integers(0, 2**30), st.integers(0, 2**30), names, names, names, names, names, names, names
    ),
)


@given(msgs=st.lists(messages, max_size=12), data=st.data())
def test_any_chunking_yields_the_same_messages(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts"))
    bounds = [0, *cuts, len(stream)]
    decoder = FrameDecoder()
    out: list[Message] = []
    for a, b in itertools.pairwise(bounds):
        chunk = stream[a:b]
        out += decoder.feed(data.draw(st.sampled_from([bytes, bytearray, memoryview]))(chunk))
    assert out == msgs
    assert decoder.pending_bytes == 0


def test_frame_layout() -> None:
    frame = encode_frame(Shutdown())
    (size,) = struct.unpack(">I", frame[:4])
    assert size == len(frame) - 4
    assert msgspec.msgpack.decode(frame[4:]) == ["shutdown"]


def test_oversized_frame_header_is_a_protocol_error() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(Shutdown())[:3]) == []
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME_BYTES + 1))


def test_encoding_an_oversized_message_is_refused() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame(Error(1, ErrorCode.INFERENCE_FAILED, "x" * (MAX_FRAME_BYTES + 1)))


@given(body=st.binary(max_size=200))
def test_garbage_is_a_protocol_error(body: bytes) -> None:
    """Any bytes in a frame decode to a valid message or raise ProtocolError, nothing else."""
    try:
        out = FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    except ProtocolError:
        return
    assert len(out) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",
        b"\x92\xa5hello\x01",
        msgspec.msgpack.encode(["infer", "not an int", {}, {}]),
        b"\x91\xa3\x00\x00\x80",
    ],
    ids=["empty", "reserved-byte", "unknown-tag", "wrong-type", "tag-not-utf8"],
)
def test_invalid_frames(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def test_messages_before_a_bad_frame_are_consumed() -> None:
    decoder = FrameDecoder()
    good = encode_frame(Hello(PROTOCOL_VERSION, 1))
    assert decoder.feed(good) == [Hello(PROTOCOL_VERSION, 1)]
    with pytest.raises(ProtocolError):
        decoder.feed(struct.pack(">I", 1) + b"\xc1")


def test_recv_message_over_a_socketpair() -> None:
    a, b = socket.socketpair()
    with a, b:
        msgs: list[Message] = [
            Hello(PROTOCOL_VERSION, os.getpid()),
            Shutdown(),
            Error(-1, ErrorCode.MODEL_LOAD_FAILED, "é" * 10),
        ]
        a.sendall(b"".join(encode_frame(m) for m in msgs))  # several frames in one read
        big = Error(7, ErrorCode.INFERENCE_FAILED, "z" * 3_000_000)  # many reads for one frame
        sender = threading.Thread(target=send_message, args=(a, big))
        sender.start()
        decoder, backlog = FrameDecoder(), []
        got = [recv_message(b, decoder, backlog) for _ in range(4)]
        sender.join()
        assert got == [*msgs, big]
        a.close()
        assert recv_message(b, decoder, backlog) is None
        assert recv_message(b, decoder, backlog) is None


def test_recv_message_returns_none_when_the_peer_dies_with_unread_messages() -> None:
    """A peer that exits without reading what we sent resets the socket: that is EOF too."""
    a, b = socket.socketpair()
    with a, b:
        child = subprocess.Popen(
            [sys.executable, "-c", "import os, sys; os.read(int(sys.argv[1]), 1)", str(b.fileno())],
            pass_fds=[b.fileno()],
        )
        b.close()
        send_message(a, Shutdown())  # the child reads one byte of it and exits
        child.wait(10)
        decoder, backlog = FrameDecoder(), []
        assert recv_message(a, decoder, backlog) is None


def test_module_exports() -> None:
    for name in control.__all__:
        assert hasattr(control, name)
