"""The gRPC listener's hot path below the servicers: fewer socket writes, cheaper answers.

grpclib writes each HTTP/2 frame group to the socket as soon as it is made: a unary answer costs
three writes (headers, data, trailers), each a system call. `CoalescingTransport` can be corked
(`corked(stream)`): the writes made meanwhile go out as one when it is uncorked, at once (deferring
them to the end of the loop turn instead added a loop turn of latency to every call). The Infer
handler sends its answer and trailers corked. `CoalescingProtocol` puts the transport under
grpclib's HTTP/2 protocol (`Server._protocol_factory`), and has its header compression send
`traceparent` (new in every call's trailers) as a literal that is never indexed and not
Huffman-coded (`TraceEncoder`): indexed, each would evict a table entry that the next answers
reuse, and coding it costs more CPU than the few bytes it saves.

`infer_response_bytes` encodes the answer to a request straight to protobuf for embeddings (packed
float32 rows: the common case and the largest message), the bytes betterproto2 would make, without
building the message objects first; `LimitedCodec.encode` passes such bytes through.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hpack
from grpclib.protocol import H2Protocol

from ...service import Embeddings, InferResult
from .encode import infer_response, task_type

__all__ = (
    "CoalescingProtocol",
    "corked",
    "CoalescingTransport",
    "TraceEncoder",
    "infer_response_bytes",
    "infer_stream_answer_bytes",
)

_DOUBLE = struct.Struct("<d")


class CoalescingTransport:
    """A transport that gathers writes while corked and sends them as one write when uncorked;
    everything else is the wrapped transport's."""

    __slots__ = ("_chunks", "_corks", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._chunks: list[bytes] = []
        self._corks = 0

    def write(self, data: bytes) -> None:
        if self._corks:
            self._chunks.append(data)
        elif data:
            self._transport.write(data)

    def cork(self) -> None:
        self._corks += 1

    def uncork(self) -> None:
        self._corks -= 1
        if not self._corks:
            self.flush()

    def flush(self) -> None:
        """Write what was gathered now."""
        chunks, self._chunks = self._chunks, []
        data = b"".join(chunks)
        if data and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@contextmanager
def corked(stream: Any) -> Iterator[None]:
    """The writes of `stream`'s connection within the block go out as one (a grpclib server stream
    not over a `CoalescingTransport`: as they come)."""
    transport = getattr(getattr(stream, "_stream", None), "_transport", None)
    if not isinstance(transport, CoalescingTransport):
        yield
        return
    transport.cork()
    try:
        yield
    finally:
        transport.uncork()


class TraceEncoder(hpack.Encoder):
    """HPACK's encoder, with `traceparent` a literal never indexed and not Huffman-coded."""

    def add(self, to_add: tuple[bytes, bytes], sensitive: bool, huffman: bool = False) -> bytes:
        if to_add[0] == b"traceparent":
            return super().add(to_add, True, False)
        return super().add(to_add, sensitive, huffman)


class CoalescingProtocol(H2Protocol):
    """grpclib's server-side HTTP/2 protocol over a `CoalescingTransport`, with a `TraceEncoder`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        wrapped = CoalescingTransport(transport)  # type: ignore[arg-type]
        super().connection_made(wrapped)  # type: ignore[arg-type]
        self.connection._connection.encoder = TraceEncoder()  # before any header block is encoded


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (bytes, string, message)."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _text(number: int, value: str) -> bytes:
    return _field(number, value.encode()) if value else b""


def _timing(queue_ms: float, inference_ms: float, total_ms: float) -> bytes:
    out = b""
    for number, value in ((1, queue_ms), (2, inference_ms), (3, total_ms)):
        if value:  # proto3: zero is not written
            out += bytes((number << 3 | 1,)) + _DOUBLE.pack(value)
    return out


def infer_response_bytes(result: InferResult, request_id: str, base_url: str) -> bytes:
    """`infer_response(result, request_id, base_url)` as protobuf bytes."""
    output = result.output
    if not isinstance(output, Embeddings) or output.vectors.dtype != "<f4":
        return bytes(infer_response(result, request_id, base_url))
    vectors = output.vectors
    shape = b"".join(_varint(int(n)) for n in vectors.shape)
    data = bytes(vectors.data)
    embeddings = (_field(1, data) if data else b"") + (_field(2, shape) if shape else b"")
    task = int(task_type(str(result.task)))
    t = result.timing
    return b"".join(
        (
            _text(1, request_id),
            _text(2, result.model_id),
            _text(3, result.version),
            b"\x20" + _varint(task) if task else b"",
            _field(5, embeddings),
            _field(8, _timing(t.queue_ms, t.inference_ms, t.total_ms)),
        )
    )


def infer_stream_answer_bytes(result: InferResult, request_id: str, base_url: str) -> bytes:
    """`InferStreamResponse(request_id=..., response=infer_response(...))` as protobuf bytes."""
    return _text(1, request_id) + _field(2, infer_response_bytes(result, request_id, base_url))
