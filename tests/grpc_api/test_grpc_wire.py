"""The listener's hot path without a server: answers encoded straight to protobuf are the bytes
betterproto2 makes of the same message, and the coalescing transport sends one loop turn's
corked writes as one."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import hpack
import numpy as np
import pytest

from modelmora._proto.modelmora import v1
from modelmora.api.grpc import (
    CoalescingTransport,
    LimitedCodec,
    TraceEncoder,
    corked,
    infer_response,
    infer_response_bytes,
    infer_stream_answer_bytes,
)
from modelmora.ipc.payloads import TensorData
from modelmora.service import Embeddings, InferResult, Texts, Timing
from modelmora.tasks import TaskType


def embeddings(rows: int, dim: int) -> Embeddings:
    data = np.random.default_rng(rows * 31 + dim).standard_normal((rows, dim)).astype("<f4")
    return Embeddings(TensorData("<f4", (rows, dim), data.tobytes()))


@pytest.mark.parametrize(
    ("output", "request_id", "timing"),
    [
        (embeddings(1, 384), "r-1", Timing(0.25, 1.5, 2.0)),
        (embeddings(3, 4), "", Timing(0.0, 0.0, 0.0)),  # zeros and empty strings are not written
        (embeddings(64, 1024), "ü-ñ", Timing(-0.0, 1e-9, 12345.678)),  # lengths over one varint byte
        (embeddings(0, 8), "x", Timing(1.0, 2.0, 3.0)),  # no rows: no data
        (Texts(["a", "b"], ["stop", "length"]), "t", Timing(1.0, 2.0, 3.0)),  # other outputs: the message
    ],
)
def test_answers_encode_to_the_bytes_of_the_message(output: Any, request_id: str, timing: Timing) -> None:
    task = TaskType.TXT2EMBED if isinstance(output, Embeddings) else TaskType.TXT2TXT
    result = InferResult("minilm", "1.0.0", task, output, timing)
    message = infer_response(result, request_id, "http://127.0.0.1:8000/")
    fast = infer_response_bytes(result, request_id, "http://127.0.0.1:8000/")
    assert fast == bytes(message)
    assert v1.InferResponse.parse(fast) == message
    stream_answer = infer_stream_answer_bytes(result, request_id, "http://127.0.0.1:8000/")
    assert stream_answer == bytes(v1.InferStreamResponse(request_id=request_id, response=message))


def test_the_codec_passes_encoded_answers_through() -> None:
    codec = LimitedCodec(1024)
    assert codec.encode(b"\x0a\x01x", v1.InferResponse) == b"\x0a\x01x"
    assert codec.encode(v1.InferResponse(request_id="x"), v1.InferResponse) == b"\x0a\x01x"


class _Sink:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info {name}"


def test_corked_writes_go_out_as_one() -> None:
    sink = _Sink()
    transport = CoalescingTransport(sink)  # type: ignore[arg-type]
    transport.write(b"now")
    assert sink.writes == [b"now"]  # uncorked: at once
    stream = SimpleNamespace(_stream=SimpleNamespace(_transport=transport))  # a grpclib server stream's shape
    with corked(stream):
        for chunk in (b"headers", b"", b"data"):
            transport.write(chunk)
        with corked(stream):
            transport.write(b"trailers")
        assert sink.writes == [b"now"]  # still corked
    assert sink.writes == [b"now", b"headersdatatrailers"]
    assert transport.get_extra_info("peername") == "info peername"  # the rest is the transport's
    transport.cork()
    transport.write(b"last")
    transport.close()  # what was gathered goes out first
    assert sink.writes[2:] == [b"last"] and sink.closed
    with corked(SimpleNamespace()):  # not over our transport: nothing to do
        pass


def test_traceparent_is_never_indexed_nor_huffman_coded() -> None:
    encoder = TraceEncoder()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    block = encoder.encode([("grpc-status", "0"), ("traceparent", traceparent)])
    assert traceparent.encode() in block  # the literal text, not Huffman-coded
    assert [name for name, _ in encoder.header_table.dynamic_entries] == [b"grpc-status"]  # not indexed
    decoded = hpack.Decoder().decode(block)
    assert decoded == [("grpc-status", "0"), ("traceparent", traceparent)]
    assert not decoded[1].indexable  # sent as never indexed
