"""The core's typed results as REST JSON bodies and server-sent events."""

from __future__ import annotations

import base64
from typing import Any

import msgspec

from ...results import absolute_url
from ...service import Embeddings, Images, InferResult, Output, Texts
from ..schemas import (
    EmbeddingOutput,
    EmbeddingResponse,
    ImageOutput,
    ImageRef,
    ImageResponse,
    TextOutput,
    TextResponse,
    Timing,
)

__all__ = ("response_body", "sse")

_encoder = msgspec.json.Encoder()


def _output(output: Output, encoding: str, base_url: str) -> EmbeddingOutput | TextOutput | ImageOutput:
    match output:
        case Embeddings(vectors):
            rows: list[list[float] | str]
            if encoding == "base64":
                rows = [base64.b64encode(b).decode("ascii") for b in vectors.row_bytes()]
            else:
                rows = [*vectors.rows()]
            return EmbeddingOutput(rows, output.dim)
        case Texts(texts, reasons):
            return TextOutput(texts, reasons)
        case Images(images):
            return ImageOutput(
                [
                    ImageRef(b64_png=base64.b64encode(i.png).decode("ascii"))
                    if i.png is not None
                    else ImageRef(url=absolute_url(i.url or "", base_url), expires_at=i.expires_at)
                    for i in images
                ]
            )
    raise AssertionError(f"unknown output {output!r}")  # pragma: no cover


def response_body(result: InferResult, encoding: str, base_url: str) -> Any:
    """The response Struct of a finished request (`encoding`: the embeddings' "float" or "base64")."""
    out = _output(result.output, encoding, base_url)
    t = result.timing
    timing = Timing(t.queue_ms, t.inference_ms, t.total_ms)
    task = str(result.task)
    if isinstance(out, EmbeddingOutput):
        return EmbeddingResponse(result.model_id, result.version, task, timing, out)
    if isinstance(out, TextOutput):
        return TextResponse(result.model_id, result.version, task, timing, out)
    return ImageResponse(result.model_id, result.version, task, timing, out)


def sse(kind: str, data: Any) -> bytes:
    """One server-sent event."""
    return b"event: " + kind.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n"
